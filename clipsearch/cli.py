"""The `cli` room: click commands, each a few lines over the library. Errors become one line on stderr and an exit code."""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import traceback
from typing import TYPE_CHECKING, Callable

import click

from . import index as index_api
from .errors import BadInput, ClipsearchError, NotAnIndex, VerifyFailed
from .query import Hit

if TYPE_CHECKING:  # pragma: no cover - `search` must not import the indexer (tqdm, multiprocessing, PIL)
    from .indexer import Progress

EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool its pipe's reader closed on

index_option = click.option("--index", "index_dir", default=None, metavar="DIR",
                             help="Index directory, or a bare name under the index home (default: 'default').")
k_option = click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1), help="Number of results.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON array instead of a table.")


class Cli(click.Group):
    """Turns library errors into one clear line and a distinct exit code; --debug shows the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ClipsearchError as exc:
            self._fail(ctx, f"error: {exc}", exc.exit_code)
        except KeyboardInterrupt:
            _leave_fast()  # the index is closed; a model still loading in the background must not hold the exit up
            self._fail(ctx, "interrupted: everything committed so far is kept; run the command again to finish",
                       EXIT_INTERRUPTED)
        except click.UsageError as exc:  # a bad option value: one line like every other error (click's exit code, 2)
            self._fail(ctx, f"error: {exc.format_message()}", exc.exit_code)
        except sqlite3.DatabaseError as exc:  # a damaged page met mid-command; the file is left as it is
            self._fail(ctx, f"error: the index database is damaged ({exc}): run `clipsearch verify`, restore it from a "
                            f"backup, or move the index away and index again", NotAnIndex.exit_code)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a Unix tool killed by SIGPIPE
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
            ctx.exit(EXIT_BROKEN_PIPE)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # a bug: still one line for the user, the traceback with --debug
            self._fail(ctx, f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
                       EXIT_INTERNAL)

    @staticmethod
    def _fail(ctx: click.Context, message: str, code: int) -> None:
        if ctx.obj and ctx.obj.get("debug"):
            traceback.print_exc()
        click.echo(f"clipsearch: {message}", err=True)
        ctx.exit(code)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="clipsearch")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Local semantic search over your photos with CLIP."""
    ctx.obj = {"debug": debug}


def _notices(idx: index_api.Index) -> None:
    for notice in idx.notices:
        click.echo(f"clipsearch: {notice}", err=True)


def _progress_bar() -> tuple[Callable[[Progress], None], Callable[[], None]]:
    """A tqdm bar with rate and ETA on stderr (silent when stderr is not a terminal)."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(event: Progress) -> None:
        if event.phase == "model" and sys.stderr.isatty():
            if "scan" in bars:
                bars.pop("scan").close()
            click.echo(f"loading {event.path} ...", err=True)
        elif event.phase == "text-encoder" and sys.stderr.isatty():
            for bar in bars.values():
                bar.close()
            bars.clear()
            click.echo("exporting the text encoder (once per model: text queries then need no torch) ...", err=True)
        elif event.phase == "scan":
            if "scan" not in bars:
                bars["scan"] = tqdm(desc="scanning", unit=" files", file=sys.stderr, disable=None)
            bar = bars["scan"]
            bar.n = event.done
            bar.refresh()
        elif event.phase in ("embed", "captions"):
            if event.phase not in bars:
                if "scan" in bars:
                    bars.pop("scan").close()
                unit = " img" if event.phase == "embed" else " captions"
                bars[event.phase] = tqdm(desc="embedding", total=event.total, unit=unit, file=sys.stderr,
                                         disable=None, smoothing=0.1)
            bar = bars[event.phase]
            bar.update(event.done - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close


@cli.command("index")
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@index_option
@click.option("--model", default=None, help="open_clip model name (default ViT-B-32; remembered by the index).")
@click.option("--pretrained", default=None, metavar="TAG_OR_FILE",
              help="open_clip pretrained tag or a local checkpoint file (default laion2b_s34b_b79k).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=None, type=click.IntRange(min=0), help="Decode processes (0: decode in-process).")
@click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="Image-tower precision (auto: bf16 on a CPU with native bf16, fp16 on CUDA, else fp32).")
def index_cmd(paths: tuple[str, ...], index_dir: str | None, model: str | None, pretrained: str | None,
              batch_size: int, workers: int | None, device: str | None, precision: str) -> None:
    """Embed every image under PATHS (re-running embeds only what changed). No PATHS: refresh every known folder."""
    update, close = _progress_bar()
    with index_api.open(index_dir, model=model, pretrained=pretrained, device=device, precision=precision) as idx:
        try:
            report = idx.index(list(paths), batch_size=batch_size, workers=workers, progress=update)
        finally:
            close()
        _notices(idx)
    for warning in report.warnings:
        click.echo(f"clipsearch: warning: {warning}", err=True)
    rate = f"{report.images_per_second:.1f} images/s"
    if report.model_seconds >= 0.1:
        rate += f" after {report.model_seconds:.1f} s loading the model"
    click.echo(f"{report.embedded} embedded in {report.seconds:.1f} s ({rate}): "
               f"{report.added} added, {report.updated} updated, {report.moved} moved, {report.copied} copied, "
               f"{report.removed} removed, {report.errors} errors, {report.unchanged} unchanged"
               + (f"; {report.captions} sidecar captions" if report.captions else ""))
    _leave_fast()  # everything is saved and closed; tearing torch down would add about 1.2 s


def _print_hits(hits: list, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([hit.to_dict() for hit in hits], ensure_ascii=False))
        return
    if not hits:
        click.echo("no results")
    for rank, hit in enumerate(hits, 1):
        if not isinstance(hit, Hit):  # a CaptionHit
            linked = f"  ({hit.image})" if hit.image else ""
            click.echo(f"{rank:>3}  {hit.score:.4f}  [{hit.collection}] {hit.text}{linked}")
        else:
            click.echo(f"{rank:>3}  {hit.score:.4f}  {hit.path}")


def filter_options(command: Callable) -> Callable:
    """The image filters, shared by search and similar; applied inside the vector search."""
    options = [
        click.option("--under", multiple=True, metavar="FOLDER", help="Only images under FOLDER (repeatable: any of them)."),
        click.option("--after", default=None, metavar="DATE",
                     help="Only images taken on or after DATE (YYYY, YYYY-MM, YYYY-MM-DD[THH:MM]); EXIF date, else file time."),
        click.option("--before", default=None, metavar="DATE", help="Only images taken on or before DATE (inclusive)."),
        click.option("--type", "types", multiple=True, metavar="EXT[,EXT]", help="Only these image types, e.g. jpg,png."),
        click.option("--threshold", default=None, type=float, metavar="SCORE", help="Drop results scoring below SCORE."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("query", nargs=-1)
@click.option("--image", "images", multiple=True, metavar="FILE", help="Add an image to the query (repeatable).")
@click.option("--not", "negatives", multiple=True, metavar="PART",
              help="Push results away from a text or image (repeatable; same as '- PART' in the query).")
@click.option("--captions", "captions", is_flag=True, help="Return the nearest captions instead of images.")
@click.option("--collection", "collections", multiple=True, metavar="NAME",
              help="With --captions: only captions from this collection (repeatable).")
@index_option
@k_option
@filter_options
@json_option
def search(query: tuple[str, ...], images: tuple[str, ...], negatives: tuple[str, ...], captions: bool,
           collections: tuple[str, ...], index_dir: str | None, k: int, under: tuple[str, ...], after: str | None,
           before: str | None, types: tuple[str, ...], threshold: float | None, as_json: bool) -> None:
    """Images (or with --captions, captions) nearest to QUERY, best first, with cosine scores.

    \b
    QUERY is a text, or parts joined by a lone + or -, each optionally weighted:
      clipsearch search kids on a beach at sunset
      clipsearch search '2*dog + beach.jpg - "cat"'
      clipsearch search --image beach.jpg --captions
    An unquoted part ending in .jpg/.png/... is an image file, #ID an indexed image; quote text to keep it text."""
    expression = " ".join(query)
    with index_api.open(index_dir, create=False, one_shot=True) as idx:
        if captions:
            if under or after or before or types:
                raise BadInput("--under, --after, --before and --type filter images; they do not apply to --captions")
            hits = idx.search_captions(expression, k, image=list(images), not_=list(negatives),
                                       collection=list(collections), threshold=threshold)
        else:
            if collections:
                raise BadInput("--collection selects captions: use it with --captions")
            hits = idx.search(expression, k, image=list(images), not_=list(negatives), under=list(under),
                              after=after, before=before, types=list(types), threshold=threshold)
        _notices(idx)
    _print_hits(hits, as_json)
    _leave_fast(idx)


@cli.command()
@click.argument("image", type=click.Path(path_type=str))
@index_option
@k_option
@filter_options
@json_option
def similar(image: str, index_dir: str | None, k: int, under: tuple[str, ...], after: str | None,
            before: str | None, types: tuple[str, ...], threshold: float | None, as_json: bool) -> None:
    """Images nearest to IMAGE (any image file; an indexed one needs no model), IMAGE itself left out."""
    with index_api.open(index_dir, create=False, one_shot=True) as idx:
        hits = idx.similar(image, k, under=list(under), after=after, before=before, types=list(types),
                           threshold=threshold)
        _notices(idx)
    _print_hits(hits, as_json)
    _leave_fast(idx)


@cli.group()
def captions() -> None:
    """Caption collections: import, list, remove."""


@captions.command("add")
@click.argument("file", type=click.Path(path_type=str))
@index_option
@click.option("--collection", default=None, metavar="NAME", help="Collection name (default: the file's name).")
@click.option("--column", default=None, metavar="COL", help=".csv/.tsv: the column holding the captions.")
@click.option("--field", "field_name", default=None, metavar="KEY", help=".jsonl/.json: the field holding the captions.")
@click.option("--model", default=None, help="open_clip model for a new index (default ViT-B-32).")
@click.option("--pretrained", default=None, metavar="TAG_OR_FILE", help="Weights for a new index.")
@click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
@json_option
def captions_add(file: str, index_dir: str | None, collection: str | None, column: str | None,
                 field_name: str | None, model: str | None, pretrained: str | None, device: str | None,
                 as_json: bool) -> None:
    """Import captions from FILE: .txt (a caption per line), .csv/.tsv, .jsonl, or COCO caption JSON.

    Rows naming an image (jsonl 'image', COCO file_name, a CSV image column) are linked to it. Importing the same file
    again changes nothing; a changed file replaces what it brought before."""
    update, close = _progress_bar()
    with index_api.open(index_dir, model=model, pretrained=pretrained, device=device) as idx:
        try:
            report = idx.add_captions(file, collection=collection, column=column, field=field_name, progress=update)
        finally:
            close()
        _notices(idx)
    _leave_fast()  # everything is saved and closed; a loaded model's teardown would only delay the exit
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False))
        return
    for problem in report.problems[:20]:
        click.echo(f"clipsearch: skipped {problem}", err=True)
    if len(report.problems) > 20:
        click.echo(f"clipsearch: ... and {len(report.problems) - 20} more rows skipped", err=True)
    if report.truncated:
        click.echo(f"clipsearch: warning: {report.truncated} captions are longer than the model's context and were "
                   f"truncated for embedding (stored in full)", err=True)
    click.echo(f"{report.collection}: {report.added} added, {report.unchanged} unchanged, {report.removed} removed, "
               f"{report.duplicates} duplicates, {len(report.problems)} skipped; {report.linked} linked to indexed "
               f"images ({report.seconds:.1f} s)")


@captions.command("list")
@index_option
@json_option
def captions_list(index_dir: str | None, as_json: bool) -> None:
    """Caption collections with their sizes and how many captions are linked to indexed images."""
    with index_api.open(index_dir, create=False) as idx:
        rows = idx.collections()
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    if not rows:
        click.echo("no caption collections")
    for row in rows:
        click.echo(f"{row['collection']}: {row['captions']} captions, {row['linked']} linked  "
                   f"({', '.join(row['sources'])})")


@captions.command("remove")
@index_option
@click.option("--collection", required=True, metavar="NAME", help="The collection to delete.")
def captions_remove(index_dir: str | None, collection: str) -> None:
    """Delete a caption collection (the caption files are not touched)."""
    with index_api.open(index_dir, create=False) as idx:
        removed = idx.remove_captions(collection)
    click.echo(f"{collection}: {removed} captions removed")


@cli.command()
@index_option
@json_option
def info(index_dir: str | None, as_json: bool) -> None:
    """What the index holds: counts, model, size on disk, folders, last run."""
    with index_api.open(index_dir, create=False, one_shot=True) as idx:
        data = idx.info()
        _notices(idx)
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    click.echo(f"index       {data['index']}")
    click.echo(f"model       {data['model']} / {data['pretrained']} ({data['dim']}-d"
               + (f", images embedded in {data['precision']})" if data.get("precision") else ")"))
    if data.get("query_encoder"):
        encoder = {"onnx": f"onnx, {data['query_weights']} weights (text queries need no torch)",
                   "torch": "torch (text queries load the model)"}
        note = data["query_encoder_note"] if data["query_encoder"] == "torch" else data["query_weights_note"]
        note = f"  [{note}]" if note else ""
        click.echo(f"queries     {encoder[data['query_encoder']]}{note}")
    click.echo(f"images      {data['images']}  (errors: {data['errors']})")
    if data.get("vector_index"):
        click.echo(f"search      {data['vector_index']['kind']} over {data['vector_index']['vectors']} vectors")
    click.echo(f"captions    {data['captions']}" + "".join(
        f"\n  {c['collection']}: {c['captions']} ({c['linked']} linked)" for c in data["collections"]))
    click.echo(f"size        {data['size_bytes'] / 1e6:.1f} MB")
    for root in data["roots"]:
        click.echo(f"folder      {root['path']}  [{root['status']}, scanned {root['last_scan']}]")
    run = data["last_run"]
    if run:
        click.echo(f"last run    {run['started']}  {run['status']}: {run['added']} added, {run['updated']} updated, "
                   f"{run['moved']} moved, {run['removed']} removed, {run['errors']} errors in {run['seconds'] or 0:.1f} s")


@cli.command()
@index_option
def verify(index_dir: str | None) -> None:
    """Check that SQLite is sound and FAISS agrees with it (exit 0 only then)."""
    with index_api.open(index_dir, create=False) as idx:
        report = idx.verify()
    for notice in report.notices:
        click.echo(f"clipsearch: {notice}", err=True)
    if not report.ok:
        raise VerifyFailed("; ".join(report.problems))
    click.echo(f"ok: SQLite and FAISS agree on {report.checked} vectors")


@cli.command()
@index_option
@json_option
def errors(index_dir: str | None, as_json: bool) -> None:
    """Files that could not be indexed, with the reason."""
    with index_api.open(index_dir, create=False) as idx:
        rows = idx.errors()
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    for row in rows:
        click.echo(f"{row['path']}: {row['error']}")


@cli.command("eval")
@click.argument("dataset", type=click.Path(path_type=str))
@click.option("--index", "index_dir", default=None, metavar="DIR",
              help="Index to evaluate in (default: 'eval-FOLDER', a named index of its own per dataset).")
@click.option("--model", default=None, help="open_clip model for a new index (default ViT-B-32).")
@click.option("--pretrained", default=None, metavar="TAG_OR_FILE", help="Weights for a new index.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=None, type=click.IntRange(min=0), help="Decode processes (0: decode in-process).")
@click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
@json_option
def eval_cmd(dataset: str, index_dir: str | None, model: str | None, pretrained: str | None, batch_size: int,
             workers: int | None, device: str | None, as_json: bool) -> None:
    """Retrieval quality on a captioned DATASET (Flickr-style .jsonl or COCO caption JSON): text->image and
    image->text recall@1/5/10 and mean rank, next to chance. Indexes the images and imports the captions first."""
    from .evaluate import default_index_name, evaluate

    update, close = _progress_bar()
    with index_api.open(index_dir or default_index_name(dataset), model=model, pretrained=pretrained,
                        device=device) as idx:
        try:
            report = evaluate(idx, dataset, batch_size=batch_size, workers=workers, progress=update)
        finally:
            close()
        _notices(idx)
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False))
        return
    click.echo(f"{report.dataset}: {report.images} images, {report.captions} captions  [{report.model}]")
    click.echo(f"{'':14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean rank':>11}   chance R@1/5/10, mean rank")
    for name, row in (("text->image", report.text_to_image), ("image->text", report.image_to_text)):
        chance = "/".join(f"{row.chance[f'R@{k}']:.4f}" for k in (1, 5, 10))
        click.echo(f"{name:14}" + "".join(f"{row.recall[f'R@{k}']:>8.4f}" for k in (1, 5, 10)) +
                   f"{row.mean_rank:>11.1f}   {chance}, {row.chance['mean_rank']:.1f}")
    for note in report.notes:
        click.echo(f"clipsearch: note: {note}", err=True)


@cli.command("serve")
@index_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every network).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in your browser.")
def serve_cmd(index_dir: str | None, host: str, port: int, open_browser: bool) -> None:
    """A local web page and JSON API over the index (search, similar, captions, upload). Ctrl-C stops it."""
    from . import server

    if not server.is_loopback(host):
        click.echo(f"clipsearch: warning: listening on {host}: anyone who can reach this machine on port {port} can "
                   f"search the index and see its photos", err=True)
    click.echo("loading the index and its model ...", err=True)
    try:
        server.serve(index_dir, host, port, open_browser=open_browser,
                     on_ready=lambda url: click.echo(f"serving {url}  (API schema: {url}openapi.json; Ctrl-C stops)",
                                                     err=True))
    except KeyboardInterrupt:
        click.echo("stopped", err=True)


def _leave_fast(*left: object) -> None:
    """Called by commands once their index is closed (everything written is committed, saved and closed), and on an
    interrupt: `main` then ends the process without tearing down FAISS, onnxruntime or torch, as nothing is left to
    save. That teardown is about a tenth of a cold query's time at 100,000 images, and 1.2 s after an indexing run
    that loaded ViT-B-32. `left` (the closed index) is kept referenced until then: freed when the command returns,
    it would unmap its vectors and tear down its onnxruntime session first (20-36 ms at 100,000 images)."""
    global _fast_exit
    _fast_exit = True
    _left_for_the_os.extend(left)


_fast_exit = False
_left_for_the_os: list[object] = []


def main() -> None:
    try:
        cli(prog_name="clipsearch")
    except SystemExit as exc:
        if not _fast_exit:
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # a closed pipe (`| head`): the output is gone either way
            pass
        os._exit(code)
