"""The text tower as an ONNX file, so a text query runs with onnxruntime and never imports torch or open_clip.

`export_text_tower` (index time, torch loaded anyway) writes ``<name>.onnx`` plus its weights in ``<name>.onnx.<tag>.data``;
the graph takes int64 tokens [batch, length] and returns L2-normalised float32 features [batch, dim]. Weights live in a
separate file because onnxruntime loads external weights fast (ViT-B-32: 0.1-0.2 s) but parses and copies weights
embedded in the protobuf (1.7-2.2 s, both on a busy 2-core machine). The metadata records the model identity, context length and tokenizer, so a caller can refuse
a file that belongs to another model.

When the text tower is the usual causal transformer pooled at the EOT token, the graph also accepts fewer positions than
the context: every position only attends to earlier ones, so cutting the padding after the longest text's EOT changes no
output, and a short query costs a few positions instead of 77.

`OnnxTextEncoder` (query time) tokenizes with `clipsearch.tokenizer` and runs the file; importing this module and building
the encoder imports numpy and onnxruntime only.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cores import usable_cores
from .errors import ModelError, ModelMismatch, first_line
from .tokenizer import ClipTokenizer, from_open_clip, read_vocabulary_in_background

__all__ = ["FORMAT_VERSION", "OnnxTextEncoder", "export_text_tower", "read_metadata"]

FORMAT_VERSION = "1"
_PREFIX = "clipsearch."
_OPSET = 17
_TRIM_CHECK_COSINE = 0.99999  # the trimmed graph must reproduce open_clip's encode_text before we rely on it
_FILE_CHECK_COSINE = 0.9999  # the written file, run by onnxruntime, against torch's output (float32 both)
_INT8_CHECK_COSINE = 0.999  # the int8 twin against torch on _check_texts(): the bar the torch-free path must meet
_RUN_BATCH = 8  # texts per onnxruntime run: int8 activations share one scale per run, so the check covers this size
_QUERIES = (
    "", "a", "a dog", "cat", "kids on a beach at sunset", "a red bicycle leaning against a brick wall",
    "two people hiking in the snowy mountains", "a plate of pasta on a wooden table", "the eiffel tower at night",
    "a black and white photo of an old man smiling", "a crowded street market in the rain", "screenshot of a chart",
    "a birthday cake with candles", "sunrise over the ocean, golden light", "Große Hunde im Park", "東京の夜景",
    "🐶🐱 &amp; friends", "IMG_2041.JPG", "A child in a yellow raincoat jumps in puddles!", "x " * 100,
)
_SUBJECTS = ("a dog", "two dogs", "a black dog", "a little girl", "a young boy", "a man", "a woman", "two children",
             "a group of people", "a cyclist", "a surfer", "a brown horse", "a white cat", "an old man", "a skier")
_ACTIONS = ("runs across", "is jumping over", "is sitting on", "plays in", "walks along", "is standing in front of",
            "rides a bike down", "swims in", "is climbing", "looks at", "is lying on", "carries a ball through")
_PLACES = ("the beach", "a grassy field", "the snow", "a busy street", "a shallow stream", "a wooden fence", "the park",
           "a rocky hill", "the water", "a red building", "a dirt track", "the ocean waves")
_TAILS = ("", " .", " at sunset", " on a sunny day", " while people watch", " near a waterfall", " in the rain")


# ------------------------------------------------------------------------------------------------------------ export


def _trimmable(net: Any) -> bool:
    """Whether the text tower is open_clip's CLIP text transformer with a causal mask and EOT pooling."""
    import torch

    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask", "text_pool_type")
    if hasattr(net, "text") or not all(hasattr(net, name) for name in needed):
        return False  # CustomTextCLIP (net.text) or something else: export open_clip's encode_text as it is
    mask = net.attn_mask
    if mask is None or getattr(net, "text_pool_type", "") not in ("argmax", "eos"):
        return False
    causal = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(torch.isneginf(mask), causal))


def _traceable_attention(mha: Any) -> Any:
    """torch's MultiheadAttention as open_clip calls it (self-attention, additive mask, no weights returned), written
    with shape-agnostic ops: traced, torch's own version bakes the example's sequence length into its reshapes."""
    import torch
    import torch.nn.functional as F

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha  # shares the parameters, copies nothing

        def forward(self, q_x: torch.Tensor, k_x: torch.Tensor, v_x: torch.Tensor, need_weights: bool = False,
                    attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
            x = q_x if mha.batch_first else q_x.transpose(0, 1)  # [batch, length, width]
            qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
            q, k, v = qkv.unflatten(-1, (3, mha.num_heads, mha.head_dim)).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).flatten(2)
            out = mha.out_proj(out)
            return (out if mha.batch_first else out.transpose(0, 1)), None

    return Attention()


@contextlib.contextmanager
def _traceable(net: Any) -> Iterator[bool]:
    """Swap the text transformer's attention modules for traceable twins for the duration (restored after);
    yields False, swapping nothing, when some block is not the plain self-attention this covers."""
    import torch

    blocks = list(getattr(net.transformer, "resblocks", []))
    plain = blocks and all(
        isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention) and b.attn._qkv_same_embed_dim
        and b.attn.in_proj_bias is not None and b.attn.bias_k is None and not b.attn.add_zero_attn
        and not hasattr(b, "ln_1_kv")
        for b in blocks
    )
    if not plain:
        yield False
        return
    originals = [b.attn for b in blocks]
    try:
        for block in blocks:
            block.attn = _traceable_attention(block.attn)
        yield True
    finally:
        for block, attn in zip(blocks, originals):
            block.attn = attn


def _text_graph(net: Any, trim: bool) -> Any:
    """A torch module tokens -> unit text features: open_clip's CLIP.encode_text, sliced to the tokens' length if trim."""
    import torch
    from open_clip.transformer import text_global_pool

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            if trim:  # CLIP.encode_text with the position embedding and causal mask cut to the tokens' length
                n = tokens.shape[1]
                cast = net.transformer.get_cast_dtype()
                x = net.token_embedding(tokens).to(cast) + net.positional_embedding[:n].to(cast)
                x = net.ln_final(net.transformer(x, attn_mask=net.attn_mask[:n, :n]))
                x = text_global_pool(x, tokens, net.text_pool_type, eos_token_id=getattr(net, "text_eos_id", None))
                if isinstance(net.text_projection, torch.nn.Linear):
                    x = net.text_projection(x)
                elif net.text_projection is not None:
                    x = x @ net.text_projection
            else:
                x = net.encode_text(tokens)
            x = x.float()
            return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return TextTower().eval()


def _check_texts() -> list[str]:
    """A broad, fixed sample for the int8 check: search-like queries (one overlong), 60 caption-like sentences (as
    real queries read; on the project's trained tiny model, Flickr captions found a worse cosine than word salads did)
    and 16 word salads of 2-25 words, one cut at the context like open_clip does."""
    import random

    rng = random.Random(0)
    captions = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}{rng.choice(_TAILS)}" for _ in range(60)
    ]
    words = sorted(set(" ".join(_QUERIES).split()))
    salads = [" ".join(rng.choice(words) for _ in range(rng.choice([2, 4, 7, 12, 25]))) for _ in range(15)]
    return [*_QUERIES, *(c[0].upper() + c[1:] if i % 2 else c for i, c in enumerate(captions)),
            " ".join(rng.choice(words) for _ in range(90)), *salads]


def _reproduces(graph: Any, reference: Any, tokens: Any) -> bool:
    """The trimmed graph, on full and on cut tokens, gives open_clip's own encode_text output ``reference`` (guards
    against open_clip's internals changing under us)."""
    import torch

    with torch.inference_mode():
        length = int(tokens.argmax(dim=-1).max()) + 1
        for candidate in (graph(tokens), graph(tokens[:, :length])):
            if float((candidate * reference).sum(dim=-1).min()) < _TRIM_CHECK_COSINE:
                return False
    return True


def _torch_export(graph: Any, tokens: Any, path: Path, trim: bool, dynamo: bool) -> None:
    import torch

    if dynamo:
        batch = torch.export.Dim("batch")
        shapes = {0: batch, 1: torch.export.Dim("length", max=tokens.shape[1])} if trim else {0: batch}
        program = torch.onnx.export(graph, (tokens,), dynamo=True, input_names=["tokens"], output_names=["features"],
                                    dynamic_shapes={"tokens": shapes}, opset_version=18, verbose=False)
        program.save(str(path), external_data=False)
        return
    axes = {"tokens": {0: "batch", 1: "length"} if trim else {0: "batch"}, "features": {0: "batch"}}
    if trim:  # trace on the tokens cut after the last EOT: the length axis is dynamic, and the trace costs less
        tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
    # Without the weights (see _attach_weights): serialising them into the protobuf was the peak of a first index run.
    torch.onnx.export(graph, (tokens,), str(path), dynamo=False, input_names=["tokens"], output_names=["features"],
                      dynamic_axes=axes, opset_version=_OPSET, export_params=False, do_constant_folding=False)


def export_text_tower(clip_model: Any, path: str | os.PathLike, *, dynamo: bool | None = None,
                      int8: bool = True) -> Path:
    """Write the text tower of a loaded `clipsearch.model.ClipModel` to ``path`` (ONNX) and its weights beside it.

    The write is atomic: the weights go to a new uniquely named file, the graph to a temporary name renamed over
    ``path``, and only then are the previous weight files removed. Raises UnsupportedTokenizer when the model's
    tokenizer has no torch-free twin (such a file could not be used), ModelError when export fails.
    ``dynamo`` picks torch's exporter: None uses the TorchScript one (several times faster) and falls back to
    torch.export when it fails (torch deprecated it in 2.9 and may remove it). Before it is committed, the file is run
    with onnxruntime against torch: a float32 file must give torch's output (cosine >= 0.9999), else ModelError.
    With ``int8`` (the default) an int8 twin (`clipsearch.text_int8`, about 1.5x faster on ViT-B-32) is written instead
    when it agrees with torch on a broad sample of texts (cosine >= 0.999, run singly and in batches); the metadata
    key ``weights`` says which was written, and ``int8`` why a float32 file was kept.
    """
    import torch

    net = clip_model._net
    tokenizer = from_open_clip(clip_model._tokenizer)
    tokens = torch.from_numpy(tokenizer(["a photo of a dog on the beach", "a cat", ""])).to(clip_model.device)
    threads = torch.get_num_threads()
    # A few small forwards and a trace: on busy shared cores, OpenMP threads waiting for each other made them ~10x
    # slower than one thread (tiny model: 1.6 s of linear layers instead of a few ms).
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            reference = _text_graph(net, trim=False)(tokens)
        dim, path = int(reference.shape[1]), Path(path)
        with _traceable(net) as traceable:
            trim = traceable and _trimmable(net) and _reproduces(_text_graph(net, trim=True), reference, tokens)
            if trim:
                _write(clip_model, _text_graph(net, trim=True), tokenizer, tokens, reference, path, True, dim, dynamo,
                       int8)
        if not trim:  # open_clip's encode_text as it is, full context
            _write(clip_model, _text_graph(net, trim=False), tokenizer, tokens, reference, path, False, dim, dynamo,
                   int8)
    finally:
        torch.set_num_threads(threads)
    return path


_ALIGN = 65536  # onnx's own allocation granularity for tensors over 1 MB: onnxruntime can map them as they are


class WeightsFile:
    """Tensors written one after another into one external-data file, those over 1 MB at offsets onnxruntime can map
    as they are; `put` returns the initializer that points at its tensor (onnx's own helper wants the bytes in the
    proto first: a copy of every tensor). With ``write=False`` nothing is written: the initializers point where the
    same tensors, put in the same order, would be (see `_write`)."""

    def __init__(self, path: Path, write: bool = True) -> None:
        self.path = path
        self.write = write
        self._offset = 0

    def __enter__(self) -> "WeightsFile":
        self._file = open(self.path, "wb") if self.write else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def put(self, name: str, array: np.ndarray) -> Any:
        import onnx
        from onnx.helper import np_dtype_to_tensor_dtype

        align = _ALIGN if array.nbytes > 1 << 20 else 64
        self._offset = -(-self._offset // align) * align
        if self._file is not None:
            array = np.ascontiguousarray(array)
            self._file.seek(self._offset)
            self._file.write(memoryview(array.reshape(-1)).cast("B"))
        tensor = onnx.TensorProto(name=name, data_type=np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                                  data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(self._offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self._offset += array.nbytes
        return tensor


def _weights_of(proto: Any, graph: Any) -> dict[str, Callable[[], np.ndarray]]:
    """The graph's weight inputs, taken out of ``proto``, as initializer names and readers of their arrays from the
    module (in file order), for `_attach_weights`.

    A weight read only through a Transpose (torch's Linear) is stored transposed and the node dropped: that is the
    constant folding the exporter would have done, and onnxruntime would otherwise redo at every load (a cold query).
    Memory stays at one tensor's copy at most; letting torch serialise the weights into the protobuf grew the process
    by 870-900 MB (ViT-B-32 text tower, 255 MB), against 450-500 MB: the model's text weights, first touched here, and
    the written file, which the check session maps (both file-backed)."""
    tensors = {**dict(graph.named_parameters()), **dict(graph.named_buffers())}
    weights = [i.name for i in proto.graph.input[1:]]
    unknown = [name for name in weights if name not in tensors]
    if unknown:
        raise ModelError(f"the exported graph reads {unknown[0]}, which the model does not have")
    readers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    planned: list[tuple[str, str, list[int] | None]] = []  # (initializer, weight, transpose perm)
    for name in weights:
        nodes = readers.get(name, [])
        if nodes and all(n.op_type == "Transpose" for n in nodes):
            for node in nodes:
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                planned.append((node.output[0], name, perm or list(range(tensors[name].dim()))[::-1]))
                proto.graph.node.remove(node)
        else:
            planned.append((name, name, None))
    del proto.graph.input[1:]

    def reader(weight: str, perm: list[int] | None) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            array = tensors[weight].detach().cpu().numpy()
            return array if perm is None else array.transpose(perm)
        return read

    return {name: reader(weight, perm) for name, weight, perm in planned}


def _attach_weights(proto: Any, weights: dict[str, Callable[[], np.ndarray]], data: Path, write: bool) -> None:
    """Add ``weights`` (`_weights_of`) to ``proto`` as initializers stored in ``data``, written tensor by tensor
    unless not ``write`` (then only placed: see WeightsFile). Initializers of the same names are replaced."""
    kept = [t for t in proto.graph.initializer if t.name not in weights]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    with WeightsFile(data, write) as out:
        for name, read in weights.items():
            proto.graph.initializer.append(out.put(name, read()))


def onnxruntime() -> Any:
    """onnxruntime, with its telemetry off unless the user has chosen (ORT_DISABLE_TELEMETRY set either way). On Linux
    it queued usage events for upload (a device id, the OS, the interpreter's path; onnxruntime 1.32 here) in
    ~/.cache/Microsoft at every import, and warned on stderr where that folder cannot be made: a local search
    engine sends nothing anywhere."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    return ort


def _check_file(path: Path, tokens: np.ndarray, reference: np.ndarray, trim: bool) -> None:
    """Run the written file with onnxruntime, on full and (when trimmed) cut tokens, against torch's own output:
    a file that would answer differently from the torch path is never committed."""
    ort = onnxruntime()

    session = ort.InferenceSession(str(path), _session_options(1, long_lived=False), providers=["CPUExecutionProvider"])
    length = int(tokens.argmax(axis=1).max()) + 1
    for candidate in [tokens, tokens[:, :length]] if trim else [tokens]:
        got = session.run(None, {"tokens": np.ascontiguousarray(candidate)})[0]
        worst = float((got * reference).sum(axis=1).min())
        if not worst >= _FILE_CHECK_COSINE:
            raise ModelError(f"the exported text tower disagrees with torch (cosine {worst:.5f})")


def _write(clip_model: Any, graph: Any, tokenizer: ClipTokenizer, tokens: Any, reference: Any, path: Path, trim: bool,
           dim: int, dynamo: bool | None, int8: bool) -> None:
    """Export, add the metadata, check, and write graph + weights atomically (see export_text_tower)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    data = path.with_name(f"{path.name}.{tag}.data")
    try:
        # The exporter's own output goes to a scratch folder: for models over 2 GB it writes one file per tensor.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
            raw = Path(scratch) / "export.onnx"
            errors: list[str] = []
            for use_dynamo in [False, True] if dynamo is None else [dynamo]:
                try:
                    with warnings.catch_warnings():  # deprecation and indexing notes that do not apply here
                        warnings.simplefilter("ignore")
                        _torch_export(graph, tokens, raw, trim, use_dynamo)
                    break
                except Exception as exc:  # noqa: BLE001 - any exporter failure: try the other, then report both
                    errors.append(f"{'torch.export' if use_dynamo else 'torchscript'}: {first_line(exc, 200)}")
            else:
                raise ModelError(f"cannot export the text tower of {clip_model.spec.name} to ONNX: {'; '.join(errors)}")
            proto = onnx.load(str(raw))
        # The TorchScript export (export_params=False) leaves the weights to us. Their float32 bytes (ViT-B-32: 255 MB)
        # are written only once no int8 twin replaces them: the twin reads them from the module.
        weights = _weights_of(proto, graph) if len(proto.graph.input) > 1 else None
        float_written = weights is None or not int8
        if weights is not None:
            _attach_weights(proto, weights, data, write=float_written)
        meta = {
            "format": FORMAT_VERSION,
            "identity": clip_model.identity,
            "context_length": str(tokenizer.context_length),
            "tokenizer": "clip-bpe",
            "vocab_size": str(tokenizer.vocab_size),
            "dim": str(dim),
            "trim": "1" if trim else "0",
            "normalized": "1",
            "weights": "float32",
        }
        del proto.metadata_props[:]
        for key, value in meta.items():
            proto.metadata_props.add(key=_PREFIX + key, value=value)
        if weights is not None:
            onnx.save_model(proto, str(tmp))
        else:  # torch.export's file carries its weights
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        kept, data = _prefer_int8(proto, weights, graph, tokenizer, trim, path, tmp, data) if int8 else (tmp, data)
        if kept == tmp:  # float32 it is: run it against torch (a twin kept was, and vouches for the graph)
            if weights is not None and not float_written:  # placed only, for the twin that was turned down
                _attach_weights(proto, weights, data, write=True)
                onnx.save_model(proto, str(tmp))
            _check_file(tmp, tokens.cpu().numpy(), reference.float().cpu().numpy(), trim)
        tmp = kept
        os.chmod(data, os.stat(tmp).st_mode & 0o777)  # onnx creates it private; give it the graph's (umask) mode
        for written in (data, tmp):
            with open(written, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)  # the commit point: the graph names its own weights file
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        raise
    for old in path.parent.glob(f"{path.name}.*.data"):
        if old != data:
            old.unlink(missing_ok=True)


def _sample_reference(graph: Any, tokens: np.ndarray, trim: bool) -> np.ndarray:
    """torch's vectors for ``tokens``, run as the file runs them (`_runs`), 16 texts at a time. Unlike the export's
    small forwards, these batches are big enough for threads to pay (ViT-B-32, 96 texts, 2 idle cores: 1.8-1.9 s
    against 3.0-3.6 s on one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(4, usable_cores()))
    try:
        with torch.inference_mode():
            done = [(rows, graph(torch.from_numpy(batch)).float().numpy()) for rows, batch in _runs(tokens, 16, trim)]
    finally:
        torch.set_num_threads(threads)
    out = np.empty((len(tokens), done[0][1].shape[1]), np.float32)
    for rows, vectors in done:
        out[rows] = vectors
    return out


def _int8_agreement(path: Path, tokens: np.ndarray, reference: np.ndarray, singly: int) -> float:
    """The worst cosine of the file against ``reference``, run as texts are run: every text in runs of 8 (the
    activations of a run share one scale, so a run is the harder case), and the first ``singly`` one at a time."""
    encoder = OnnxTextEncoder(path, long_lived=True)  # runs twice as fast as a one-shot session; their cosines
    #                                                    against torch agree within 1e-5 (ViT-B-32: 0.99952 / 0.99951)
    one_by_one = np.concatenate([encoder.encode_tokens(tokens[i:i + 1]) for i in range(singly)])
    batched = encoder.encode_tokens(tokens)
    return float(min((one_by_one * reference[:singly]).sum(axis=1).min(), (batched * reference).sum(axis=1).min()))


def _prefer_int8(proto: Any, weights: dict[str, Callable[[], np.ndarray]] | None, graph: Any,
                 tokenizer: ClipTokenizer, trim: bool, path: Path, tmp: Path, data: Path) -> tuple[Path, Path]:
    """Write the int8 twin of the float32 file ``tmp`` (+ ``data``, whose arrays ``weights`` reads from the module
    when given) and return the pair to commit: the twin when it agrees with torch (the float32 pair is then removed),
    else the float32 pair, its metadata saying why. A twin that agrees with torch on 96 texts vouches for the graph it
    was made from, so the caller runs the float32 file only when that is what it keeps (0.35 s of a ViT-B-32
    export)."""
    import onnx

    from .text_int8 import write_int8

    twin = tmp.with_name(f"{tmp.name}.int8")
    twin_data = path.with_name(f"{path.name}.{secrets.token_hex(4)}.data")
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        read = None if weights is None else (lambda tensor: weights[tensor.name]())
        count = write_int8(tmp, twin, twin_data, {**meta, _PREFIX + "weights": "int8"}, read)
        if not count:
            why = "no matrix to quantize"
        else:
            tokens = tokenizer(_check_texts())
            worst = _int8_agreement(twin, tokens, _sample_reference(graph, tokens, trim), singly=40)
            if worst >= _INT8_CHECK_COSINE:
                twin_proto = onnx.load(str(twin), load_external_data=False)  # `proto` stays the float32 graph
                twin_proto.metadata_props.add(key=_PREFIX + "int8", value=f"cosine {worst:.5f} against torch")
                onnx.save_model(twin_proto, str(twin))
                tmp.unlink()
                data.unlink(missing_ok=True)  # never written, when the module gave the twin its arrays
                return twin, twin_data
            why = f"int8 cosine {worst:.5f} < {_INT8_CHECK_COSINE} against torch"
    except Exception as exc:  # noqa: BLE001 - an int8 twin that cannot be built or run only costs speed
        why = f"int8 failed: {first_line(exc, 200)}"
    except BaseException:
        twin.unlink(missing_ok=True)
        twin_data.unlink(missing_ok=True)
        raise
    twin.unlink(missing_ok=True)
    twin_data.unlink(missing_ok=True)
    proto.metadata_props.add(key=_PREFIX + "int8", value=why)
    onnx.save_model(proto, str(tmp))
    return tmp, data


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------------------- query


def _runs(tokens: np.ndarray, size: int, trim: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, int64 tokens) of at most ``size`` texts each. With ``trim``, texts of similar length run together and
    each run is cut after its longest text's EOT (the largest token id, as open_clip assumes)."""
    ends = tokens.argmax(axis=1)
    order = np.argsort(ends, kind="stable") if trim else np.arange(len(tokens))
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        batch = tokens[rows, : int(ends[rows].max()) + 1] if trim else tokens[rows]
        yield rows, np.ascontiguousarray(batch, dtype=np.int64)


def _session_options(threads: int | None, long_lived: bool) -> Any:
    """Options for a one-shot CLI query (fast load) or a long-lived process (fast runs).

    Measured on ViT-B-32, 2 busy cores: full graph optimisation + weight prepacking load in 0.5-0.8 s and run a query in
    ~35 ms; basic optimisation without prepacking loads in 0.12-0.2 s and runs a query in ~60 ms. A new process per
    query pays load + one run, so it wants the second; a server answering many queries wants the first. The one-shot
    session skips even the basic optimisations: the exported graph is already folded (the transposed weights are
    written as such), so they changed no output bit (int8 and float32 files) and cost 30-40 ms of load (session 41
    against 74 ms, int8 file, medians of 5).
    """
    ort = onnxruntime()

    options = ort.SessionOptions()
    if long_lived:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.intra_op_num_threads = threads or min(4, usable_cores())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # do not burn shared cores between runs
    options.log_severity_level = 3
    return options


def read_metadata(session: Any) -> dict[str, str]:
    """The clipsearch.* metadata of a loaded onnxruntime session, without the prefix."""
    props = session.get_modelmeta().custom_metadata_map
    return {key[len(_PREFIX):]: value for key, value in props.items() if key.startswith(_PREFIX)}


class OnnxTextEncoder:
    """Texts -> (N, dim) unit float32 vectors with onnxruntime and the torch-free tokenizer.

    ``identity`` (the ClipModel identity the index expects) makes a file of another model a ModelMismatch; a missing,
    damaged or foreign file is a ModelError. ``context_length`` defaults to the one recorded at export. ``long_lived``
    trades a slower load for faster queries (a server); ``threads`` defaults to the usable cores, at most 4.
    """

    def __init__(self, path: str | os.PathLike, context_length: int | None = None, *, identity: str | None = None,
                 threads: int | None = None, long_lived: bool = False) -> None:
        ort = onnxruntime()

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"text encoder file not found: {self.path}")
        vocabulary = read_vocabulary_in_background()  # beside the session load, which frees the GIL: 35-40 ms sooner
        try:
            self._session = ort.InferenceSession(str(self.path), _session_options(threads, long_lived),
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind exception types for bad files
            raise ModelError(f"cannot load text encoder {self.path}: {first_line(exc)}") from exc
        finally:
            vocabulary.join()
        self.metadata = meta = read_metadata(self._session)
        if meta.get("format") != FORMAT_VERSION or meta.get("tokenizer") != "clip-bpe":
            raise ModelError(f"{self.path} is not a clipsearch text encoder (format {meta.get('format')!r})")
        self.identity = meta.get("identity", "")
        if identity is not None and identity != self.identity:
            raise ModelMismatch(f"text encoder {self.path} belongs to another model than this index")
        recorded = int(meta["context_length"])
        if context_length is not None and int(context_length) != recorded:
            raise ModelMismatch(f"text encoder {self.path} has context length {recorded}, not {context_length}")
        self.context_length = recorded
        self.dim = int(meta["dim"])
        self._trim = meta.get("trim") == "1"
        self.weights = meta.get("weights", "float32")  # "int8" for the twin of clipsearch.text_int8
        self.int8_note = meta.get("int8", "")  # the int8 check's outcome: its cosine, or why float32 was kept
        self.tokenizer = ClipTokenizer(recorded)
        if self.tokenizer.vocab_size != int(meta.get("vocab_size", self.tokenizer.vocab_size)):
            raise ModelError(f"{self.path} was exported with another vocabulary than open_clip's installed one")

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """(N, context_length) int64 tokens -> (N, dim) unit vectors, a few texts per run (as the export checked
        them); each run's padding after its last EOT is cut when allowed."""
        out = np.empty((len(tokens), self.dim), np.float32)
        for rows, batch in _runs(tokens, _RUN_BATCH, self._trim):
            out[rows] = self._session.run(None, {"tokens": batch})[0]
        return out

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, dim) unit vectors; texts longer than the context are truncated like open_clip does."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_tokens(self.tokenizer(texts))
