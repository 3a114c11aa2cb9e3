"""The `model` room: loading an open_clip model and turning pixels and texts into L2-normalised float32 vectors.

It knows nothing of files beyond the checkpoint it loads, nor of SQLite or FAISS. torch and open_clip are imported lazily
so that commands which never embed (info, verify) start fast.

Precision: the image tower may run in bfloat16 (a CPU with native bf16 instructions) or float16 (CUDA); the text tower
always stays float32, so torch and ONNX text vectors stay comparable and a query costs the same everywhere. Vectors of
every precision are interchangeable (cosine >= 0.999 to float32), so the model identity does not include it.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import pickle
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .cores import usable_cores
from .errors import ModelError, first_line
from .hub import unobtainable
from .media import PreprocessSpec, fingerprint
from .open_clip_import import import_open_clip
from .tokenizer import ClipTokenizer, UnsupportedTokenizer, from_open_clip

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
PROJECT_CONFIGS = Path(__file__).with_name("model_configs")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_MADV_PAGEOUT = 21  # linux/mman-common.h, Linux 5.4+
_NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
"""Per low precision, the CPU flags of native dot products in it: without them it is emulated, several times slower."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load: an open_clip name and a pretrained tag or local checkpoint file."""

    name: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED

    @classmethod
    def for_model(cls, name: str) -> "ModelSpec":
        """A model named without weights gets its first published tag (the default tag for the default model)."""
        if name == DEFAULT_MODEL:
            return cls(name, DEFAULT_PRETRAINED)
        open_clip = import_open_clip()

        tags = open_clip.list_pretrained_tags_by_model(name)
        return cls(name, tags[0] if tags else "")

    @classmethod
    def default(cls) -> "ModelSpec":
        """The model for new indexes: $CLIPSEARCH_MODEL / $CLIPSEARCH_PRETRAINED when set, else ViT-B-32 on LAION-2B."""
        return cls(os.environ.get("CLIPSEARCH_MODEL") or DEFAULT_MODEL,
                   os.environ.get("CLIPSEARCH_PRETRAINED") or DEFAULT_PRETRAINED)

    def resolved(self) -> "ModelSpec":
        """Checkpoint paths made absolute, so an index can find its model again from any working directory."""
        candidate = _checkpoint_file(self.pretrained)
        return ModelSpec(self.name, str(candidate.resolve())) if candidate is not None else self


def register_project_configs() -> None:
    """Make the configs shipped in `clipsearch/model_configs` known to open_clip by name, like its built-in ones."""
    open_clip = import_open_clip()

    if PROJECT_CONFIGS not in getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", []):
        open_clip.add_model_config(PROJECT_CONFIGS)


def config_preprocess(spec: ModelSpec) -> tuple[PreprocessSpec, int] | None:
    """The preprocessing and dimension a model's open_clip config implies, read without importing torch or open_clip
    (2-3 s), so that a new index can decode images while its model loads. Only a guess: a pretrained tag may bring its
    own mean, std or resize mode, so what the loaded model says wins (the indexer decodes again if they differ).

    None when it cannot tell: a hf-hub: or local-dir: model, a name without a config here, or a checkpoint file that
    does not exist (loading would fail; the caller should say so before decoding anything)."""
    if spec.name.startswith(("hf-hub:", "local-dir:")):
        return None
    if _names_a_file(spec.pretrained) and not os.path.isfile(Path(spec.pretrained).expanduser()):
        return None  # missing, or out of this user's reach: loading says which
    found = importlib.util.find_spec("open_clip")  # finds the package without running it
    folders = [PROJECT_CONFIGS]  # registered after open_clip's own, so ours win a name they share (as in open_clip)
    if found is not None and found.submodule_search_locations:
        folders.append(Path(list(found.submodule_search_locations)[0]) / "model_configs")
    for folder in folders:
        try:
            config = json.loads((folder / f"{spec.name.replace('/', '-')}.json").read_text(encoding="utf-8"))
            dim, vision = config["embed_dim"], config["vision_cfg"]
            return PreprocessSpec.from_open_clip({"size": vision.get("image_size", 224)}), int(dim)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    return None


def _names_a_file(pretrained: str) -> bool:
    """Whether ``pretrained`` reads as a checkpoint path rather than a tag (a file suffix, or a folder in it)."""
    return Path(pretrained).suffix.lower() in _CHECKPOINT_SUFFIXES or os.sep in pretrained


def _checkpoint_file(pretrained: str) -> Path | None:
    """The checkpoint file ``pretrained`` names; None for a tag or a missing file. One this user may not read is an
    error of its own (pathlib raises for a folder that may not be entered; a tag-or-mismatch guess would mislead)."""
    path = Path(pretrained).expanduser()
    try:
        if not path.is_file():
            return None
        with path.open("rb"):
            return path
    except PermissionError as exc:
        raise ModelError(f"cannot read checkpoint '{pretrained}': permission denied") from exc


def pretrained_id(spec: ModelSpec) -> str:
    """What identifies the weights: the tag itself, or a content fingerprint of a checkpoint file (so a moved file still matches)."""
    path = _checkpoint_file(spec.pretrained)
    return f"file:{fingerprint(path)}" if path is not None else spec.pretrained


def _check_spec(spec: ModelSpec) -> None:
    """Fail early with a message a person can act on, before open_clip raises something vaguer."""
    open_clip = import_open_clip()

    if spec.name.startswith(("hf-hub:", "local-dir:")):
        return
    if open_clip.get_model_config(spec.name) is None:
        raise ModelError(f"unknown model '{spec.name}' (open_clip knows e.g. ViT-B-32, ViT-B-16, ViT-L-14, RN50)")
    if not spec.pretrained:
        raise ModelError(f"{spec.name} has no published weights: pass a checkpoint file with --pretrained FILE")
    if _checkpoint_file(spec.pretrained) is not None or open_clip.get_pretrained_cfg(spec.name, spec.pretrained):
        return
    if _names_a_file(spec.pretrained):
        raise ModelError(f"checkpoint file not found: {spec.pretrained}")
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.name)) or "none"
    raise ModelError(
        f"'{spec.pretrained}' is neither a pretrained tag of {spec.name} (known: {tags}) nor a checkpoint file"
    )


def _offline_hint(spec: ModelSpec, why: str = "offline?") -> str:
    if spec.name.startswith("hf-hub:"):  # its repository names the weights; --pretrained is not used
        return f"{spec.name} is not cached and could not be downloaded ({why}); download it once with network"
    return (
        f"weights '{spec.pretrained}' for {spec.name} are not cached and could not be downloaded ({why}); "
        f"download them once with network, or pass a local checkpoint: --pretrained /path/to/open_clip_model.safetensors"
    )


def model_identity(name: str, weights: str, preprocess: PreprocessSpec) -> str:
    """Name + weights (`pretrained_id`) + preprocessing: models with equal identities give interchangeable vectors."""
    return json.dumps({"model": name, "pretrained": weights, "preprocess": asdict(preprocess)}, sort_keys=True)


def identity_preprocess(identity: str) -> PreprocessSpec | None:
    """The preprocessing a recorded `model_identity` names, so an index can decode images before its model loads;
    None for an empty or unreadable one."""
    try:
        return PreprocessSpec.from_dict(json.loads(identity)["preprocess"])
    except (ValueError, KeyError, TypeError):
        return None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere, or when /proc/cpuinfo cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def _on_cpu(device: str) -> bool:
    """Whether a torch device string names the CPU ('cpu', 'cpu:0'): the one spelling of that check."""
    return str(device).partition(":")[0] == "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """'auto' becomes fp16 on CUDA, bf16 on a CPU with native bf16 (AVX512-BF16 or AMX), else fp32; others are kept.

    Measured with a random-init ViT-B-32, batch 32 (bench/model_speed.py): on a Zen 3 CPU (AVX2, no bf16 instructions)
    bf16 runs about 6x slower than fp32, so 'auto' must not pick it there; on CPUs with AVX512-BF16 it runs about 2x
    faster (issue 5).
    """
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if precision != "auto":
        return precision
    if str(device).startswith("cuda"):
        return "fp16"
    if _on_cpu(device) and _native_on_cpu("bf16"):
        return "bf16"
    return "fp32"


def precision_warning(precision: str, device: str) -> str | None:
    """Why a precision chosen by hand will be slow: a CPU without native math for it emulates it. Measured here
    (Zen 4, AVX512-BF16 but no AVX512-FP16; random-init ViT-B-32, batch 32): fp16 3.4 images/s against bf16 38.6
    and fp32 16.7; on a CPU without bf16, bf16 ran about 6x slower than fp32."""
    if not _on_cpu(device) or precision not in _NATIVE_CPU_FLAGS or _native_on_cpu(precision):
        return None
    return (f"this CPU has no native {precision} math ({' or '.join(_NATIVE_CPU_FLAGS[precision])}): {precision} runs "
            f"several times slower here than --precision auto")


def _native_on_cpu(precision: str) -> bool:
    return not cpu_flags().isdisjoint(_NATIVE_CPU_FLAGS[precision])


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


class _Load:
    """What one thread's checkpoint load needs its hooks to know."""

    def __init__(self, in_place: bool) -> None:
        self.in_place = in_place
        self.loaded = False


_loads = threading.local()  # `.load`: the _Load of the checkpoint this thread is loading, if any
_hooks_lock = threading.Lock()
_hooks_users = 0  # loads in progress, in any thread: the hooks are installed while there is one
_hooks_originals: dict[tuple[Any, str], Any] = {}


def _this_threads_load() -> _Load | None:
    return getattr(_loads, "load", None)


def _install_hooks(torch: Any) -> None:
    """Put hooks on torch.nn.init, Module.load_state_dict and torch.load that act only in a thread loading a
    checkpoint (`_loads.load` set) and are the originals everywhere else (called with `_hooks_lock` held)."""
    init, module = torch.nn.init, torch.nn.Module

    def skipped_in_loads(original: Any) -> Any:
        def initialise(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            return tensor if _this_threads_load() else original(tensor, *args, **kwargs)
        return initialise

    load_state_dict, load = module.load_state_dict, torch.load

    def checked_load_state_dict(self: Any, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        current = _this_threads_load()
        if current is None:
            return load_state_dict(self, state_dict, strict=strict, assign=assign)
        own = self.state_dict(keep_vars=True)
        missing = sorted(set(own) - set(state_dict))
        if missing:
            raise RuntimeError(f"the checkpoint has no weights for {', '.join(missing[:5])}"
                               f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
        current.loaded = True
        if current.in_place:
            state_dict = {key: value.to(own[key].dtype) if key in own and torch.is_tensor(value)
                          and value.dtype != own[key].dtype else value for key, value in state_dict.items()}
        return load_state_dict(self, state_dict, strict=strict, assign=assign or current.in_place)

    def mapped_load(*args: Any, **kwargs: Any) -> Any:
        current = _this_threads_load()
        if current is not None and current.in_place:
            kwargs.setdefault("mmap", True)
        return load(*args, **kwargs)

    hooks = {(init, name): skipped_in_loads(getattr(init, name)) for name in _INIT_FUNCTIONS if hasattr(init, name)}
    hooks[(module, "load_state_dict")] = checked_load_state_dict
    hooks[(torch, "load")] = mapped_load
    for (owner, name), hook in hooks.items():
        _hooks_originals[(owner, name)] = getattr(owner, name)
        setattr(owner, name, hook)


@contextmanager
def _checkpoint_loading(torch: "Any", in_place: bool) -> "Iterator[None]":
    """While open_clip builds a model and loads its checkpoint in this thread, keep only one copy of the weights in
    memory.

    Left alone, open_clip draws random weights (ViT-B-32: 605 MB), reads the whole checkpoint (another 605 MB), then
    copies one into the other, so indexing peaked near 2 GB. Here the torch.nn.init functions do nothing, so the random
    weights' allocation is never touched and never becomes resident; and on CPU (`in_place`) the checkpoint is mapped
    (safetensors always is; torch.load with `mmap`) and assigned (`load_state_dict(assign=True)`): the weights are the
    file's pages. Tensors whose dtype differs from the parameter's (an fp16 checkpoint) are converted first, as a copy
    would have. ViT-B-32 load, peak RSS: 1915 MB copied, 1337 MB assigned, 960-990 MB without the random draw.

    With no initialisation, every parameter and persistent buffer must come from the checkpoint: a load that leaves
    one out is refused, and so is a build that loads nothing. Buffers open_clip computes (attention masks) do not use
    torch.nn.init.

    The hooks are torch's, so they are process-wide, but they act only in the loading thread: another thread building
    or loading a model meanwhile gets torch's own behaviour (an indexing run loads its model in a background thread).
    They are installed by the first load in progress and removed by the last, so two loads at once can neither leave
    them behind nor take them away from each other."""
    global _hooks_users
    with _hooks_lock:
        if not _hooks_users:
            _install_hooks(torch)
        _hooks_users += 1
    _loads.load = current = _Load(in_place)
    try:
        yield
        if not current.loaded:
            raise RuntimeError("open_clip built the model but loaded no weights into it")
    finally:
        del _loads.load
        with _hooks_lock:
            _hooks_users -= 1
            if not _hooks_users:
                for (owner, name), original in _hooks_originals.items():
                    setattr(owner, name, original)
                _hooks_originals.clear()


def _page_out(tensors: Sequence["torch.Tensor"]) -> int:
    """Ask Linux to reclaim the pages of these CPU tensors that a file holds (MADV_PAGEOUT), such as a mapped
    checkpoint's: the file gives them back on the next access, so nothing is lost, and it is for pages read once and
    not needed soon. Anonymous memory is left alone, since reclaiming it would only write it to swap. Returns the bytes
    advised (0 elsewhere than Linux, or on a kernel before 5.4). Tensors on another device are skipped."""
    tensors = [tensor for tensor in tensors if tensor.device.type == "cpu"]
    if not tensors or not sys.platform.startswith("linux"):
        return 0
    import bisect
    import mmap

    spans = []  # (start, end) of this process's file mappings, in address order
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                spans.append(tuple(int(x, 16) for x in fields[0].split("-")))
    starts = [start for start, _end in spans]
    madvise = _libc().madvise
    page, released = mmap.PAGESIZE, 0
    for tensor in tensors:
        start = -(-tensor.data_ptr() // page) * page  # whole pages inside the tensor only
        end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
        at = bisect.bisect_right(starts, start) - 1
        if end > start and at >= 0 and end <= spans[at][1]:
            if madvise(start, end - start, _MADV_PAGEOUT) != 0:
                return released  # a kernel before 5.4, or a sandbox without it: keep the pages
            released += end - start
    return released


class ClipModel:
    """A loaded open_clip model with the preprocessing it was trained with."""

    def __init__(self, spec: ModelSpec, device: str | None = None, precision: str = "auto") -> None:
        import torch

        register_project_configs()
        open_clip = import_open_clip()

        spec = spec.resolved()
        _check_spec(spec)
        if why := unobtainable(open_clip, spec.name, spec.pretrained):
            raise ModelError(_offline_hint(spec, why))
        self.spec = spec
        self.device = device or default_device()
        self.precision = resolve_precision(precision, self.device)  # the one used, never 'auto'
        quiet = logging.getLogger()
        previous = quiet.level
        quiet.setLevel(logging.CRITICAL)  # open_clip logs at error level before raising; we raise our own clear error
        try:
            with _checkpoint_loading(torch, in_place=self.on_cpu):
                net, _, _ = open_clip.create_model_and_transforms(
                    spec.name, pretrained=spec.pretrained, device=self.device
                )
        except (RuntimeError, AssertionError) as exc:
            text = str(exc) or type(exc).__name__
            if "Failed to download" in text or "offline" in text.lower():
                raise ModelError(_offline_hint(spec)) from exc
            raise ModelError(f"cannot load {spec.name} with '{spec.pretrained}': {text.splitlines()[0]}") from exc
        except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
            raise ModelError(f"cannot read checkpoint '{spec.pretrained}': {first_line(exc)}") from exc
        finally:
            quiet.setLevel(previous)
        net.eval()
        self._net = net
        self._torch = torch
        self._image_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self._file_weights: list[tuple[Any, Any]] = []  # (parameter, its float32 data in the mapped checkpoint)
        self._converting = threading.Lock()
        self._image_ready = False
        self._ready_image_tower()
        self._tokenizer = open_clip.get_tokenizer(spec.name)
        try:  # the torch-free twin of the tokenizer, when the model uses the standard CLIP one (ids proven identical)
            self.text_tokenizer: ClipTokenizer | None = from_open_clip(self._tokenizer)
        except UnsupportedTokenizer:
            self.text_tokenizer = None
        self.preprocess = PreprocessSpec.from_open_clip(net.visual.preprocess_cfg)
        # From the config when open_clip has one: a forward would make the text tower's pages resident for the whole
        # indexing run (ViT-B-32: 160 MB) although only the export at its end reads them.
        config = open_clip.get_model_config(spec.name) or {}
        self.dim = int(config.get("embed_dim") or self.encode_texts(["a"]).shape[1])
        self.pretrained_id = pretrained_id(spec)  # hashed once: the checkpoint does not change under a loaded model
        self.identity = model_identity(spec.name, self.pretrained_id, self.preprocess)

    def _normalise(self, features: "torch.Tensor") -> np.ndarray:
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32)

    def _ready_image_tower(self) -> None:
        """Put the image tower in its precision (the text tower stays float32: see the module doc), once, and again
        after release_image_weights.

        The conversion reads every float32 page of the mapped tower, and those pages would stay resident (the mapping
        lives on for the text tower) though nothing reads them again: ViT-B-32 in bf16, 350 MB. So they are handed
        back to the OS, and when they are the checkpoint file's own pages the parameters' float32 data is kept (no
        resident cost) for release_image_weights to go back to."""
        with self._converting:
            if self._image_ready:
                return
            visual = self._net.visual
            converted = [(t, t.detach()) for t in visual.parameters()  # .to() swaps the data out of each parameter
                         if t.is_floating_point() and t.dtype != self._image_dtype]
            old = [data for _t, data in converted] + [t for t in visual.buffers()
                                                      if t.is_floating_point() and t.dtype != self._image_dtype]
            visual.to(self._image_dtype)
            released = _page_out(old)
            total = sum(t.numel() * t.element_size() for t in old)
            if converted and released * 10 >= total * 9:  # file pages: keeping them costs no memory
                self._file_weights = converted
            del old, converted
            self._image_ready = True

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 model input (see media.to_model_input) -> (N, dim) unit vectors."""
        torch = self._torch
        if not self._image_ready:
            self._ready_image_tower()
        with torch.inference_mode():
            pixels = torch.from_numpy(batch).to(self.device, dtype=self._image_dtype)
            return self._normalise(self._net.encode_image(pixels))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, dim) unit vectors; texts longer than the context are truncated by the tokenizer."""
        torch = self._torch
        with torch.inference_mode():
            tokens = self._tokenizer(list(texts)).to(self.device)
            return self._normalise(self._net.encode_text(tokens))

    def release_image_weights(self) -> int:
        """Hand the image tower's resident weights back to the OS (Linux, CPU; elsewhere a no-op); returns the bytes
        advised. The next image forward reads them again from the checkpoint file (and converts them again).

        On CPU the float32 weights are the checkpoint file's mapped pages (see _checkpoint_loading). A tower converted
        to bf16 holds copies that exist nowhere else: when its float32 data is the file's, the parameters go back to
        it and the copies are freed. An indexing run calls this before exporting the text tower, which otherwise
        stacks on top of them: ViT-B-32, 335 MB fewer at the run's peak in float32, 176 MB in bf16. Not while images
        are being encoded (the indexer's streams are closed by then)."""
        with self._converting:
            if self._file_weights:
                for parameter, data in self._file_weights:
                    parameter.data = data
                self._file_weights = []
                self._image_ready = False
                _trim_heap()  # the copies were freed into glibc's heaps, which keep them resident until trimmed
            return _page_out([*self._net.visual.parameters(), *self._net.visual.buffers()])

    @property
    def on_cpu(self) -> bool:
        return _on_cpu(self.device)

    @property
    def context_length(self) -> int:
        return int(getattr(self._tokenizer, "context_length", 77))

    def overlong(self, texts: Sequence[str]) -> list[bool]:
        """Which texts the tokenizer cuts at the context length, so an import can say how many were truncated."""
        encode = getattr(self._tokenizer, "encode", None)
        if encode is None:  # tokenizers without a plain BPE encode (some hf-hub models): cannot tell, claim nothing
            return [False] * len(texts)
        limit = self.context_length - 2  # start and end tokens
        return [len(encode(text)) > limit for text in texts]


class EncodeStreams:
    """`encode_images` for the indexer: each batch split over streams, threads with their own share of the cores.

    On the CPU, torch splits every operation of a batch over all cores, and each operation ends when its slowest
    thread does. Measured on 2 cores (Zen 4, ViT-B-32 in bf16, alternating in one process, 6 rounds): batches of 32 as
    two halves at once, one thread each, ran 37.1-39.6 images/s against 34.0-36.6 as one batch on two threads (float32:
    within 4% either way). The streams also suit the decode workers, which take a core now and then: that pauses one
    stream instead of stalling every thread of the batch at its next operation's end. Splitting each batch, rather
    than giving each stream whole batches, keeps the streams finishing together, so the last batch of a run does not
    leave a core idle. Elsewhere than the CPU there is one stream, which still lets the caller gather the next batch
    while one runs.

    torch's thread count is per thread, and new threads inherit the last one set anywhere: `close` sets the caller's
    count again, so threads started later (another run's, a server's) get the usual count."""

    def __init__(self, model: ClipModel, streams: int | None = None) -> None:
        cores = usable_cores()
        self.count = streams or (min(2, cores) if model.on_cpu else 1)
        self._threads = max(1, cores // self.count) if model.on_cpu else None
        self._model = model
        self._restore = model._torch.get_num_threads()
        self._parts: list[Future] = []
        self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="clipsearch-encode",
                                        initializer=self._claim_cores)

    def _claim_cores(self) -> None:
        if self._threads is not None:
            self._model._torch.set_num_threads(self._threads)

    def submit(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """Start encoding (N, 3, H, W) model input (see ClipModel.encode_images); returns the call that waits for
        its (N, dim) vectors, in the batch's order."""
        parts = [self._pool.submit(self._model.encode_images, part)
                 for part in np.array_split(batch, max(1, min(self.count, len(batch))))]
        self._parts = [part for part in self._parts if not part.done()] + parts
        return lambda: np.concatenate([part.result() for part in parts])

    @property
    def busy(self) -> bool:
        """Whether some batch submitted is still encoding, or queued for a stream."""
        return any(not part.done() for part in self._parts)

    def close(self, wait: bool = True) -> None:
        """Stop the streams; `wait=False` leaves a batch already running to finish alone (an interrupted run)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
        if self._threads is not None:
            self._model._torch.set_num_threads(self._restore)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """The C library, with the signatures of the calls made here (madvise, malloc_trim)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return libc


def _trim_heap() -> None:
    """Hand the memory that freed allocations leave in glibc's heaps back to the OS (malloc_trim; elsewhere a no-op).
    It trims every thread's heap (arena): the image tower's bf16 copies freed by release_image_weights, and what the
    encode streams' threads freed (about 50 MB, resident through the text export, the first run's peak)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        _libc().malloc_trim(0)
    except (AttributeError, OSError):  # pragma: no cover - a libc without it (musl)
        pass
