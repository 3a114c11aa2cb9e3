"""The `cli` room: click commands, each a few lines over the library. Errors become one line on stderr and an exit code."""
from __future__ import annotations

import json
import sys
import traceback
from typing import Callable

import click

from . import index as index_api
from .errors import ClipsearchError, VerifyFailed
from .indexer import Progress

EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70

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
            self._fail(ctx, "interrupted: everything committed so far is kept; run the command again to finish",
                       EXIT_INTERRUPTED)
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
            click.echo(f"loading {event.path} ...", err=True)
        elif event.phase == "scan":
            if "scan" not in bars:
                bars["scan"] = tqdm(desc="scanning", unit=" files", file=sys.stderr, disable=None)
            bar = bars["scan"]
            bar.n = event.done
            bar.refresh()
        elif event.phase == "embed":
            if "embed" not in bars:
                if "scan" in bars:
                    bars.pop("scan").close()
                bars["embed"] = tqdm(desc="embedding", total=event.total, unit=" img", file=sys.stderr,
                                     disable=None, smoothing=0.1)
            bar = bars["embed"]
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
def index_cmd(paths: tuple[str, ...], index_dir: str | None, model: str | None, pretrained: str | None,
              batch_size: int, workers: int | None, device: str | None) -> None:
    """Embed every image under PATHS (re-running embeds only what changed). No PATHS: refresh every known folder."""
    update, close = _progress_bar()
    with index_api.open(index_dir, model=model, pretrained=pretrained, device=device) as idx:
        try:
            report = idx.index(list(paths), batch_size=batch_size, workers=workers, progress=update)
        finally:
            close()
        _notices(idx)
    for warning in report.warnings:
        click.echo(f"clipsearch: warning: {warning}", err=True)
    click.echo(f"{report.embedded} embedded in {report.seconds:.1f} s ({report.images_per_second:.1f} images/s): "
               f"{report.added} added, {report.updated} updated, {report.moved} moved, {report.copied} copied, "
               f"{report.removed} removed, {report.errors} errors, {report.unchanged} unchanged")


def _print_hits(hits: list, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([hit.to_dict() for hit in hits], ensure_ascii=False))
        return
    if not hits:
        click.echo("no results")
    for rank, hit in enumerate(hits, 1):
        click.echo(f"{rank:>3}  {hit.score:.4f}  {hit.path}")


@cli.command()
@click.argument("text")
@index_option
@k_option
@json_option
def search(text: str, index_dir: str | None, k: int, as_json: bool) -> None:
    """Images nearest to TEXT, best first, with cosine scores."""
    with index_api.open(index_dir, create=False) as idx:
        hits = idx.search(text, k=k)
        _notices(idx)
    _print_hits(hits, as_json)


@cli.command()
@click.argument("image", type=click.Path(path_type=str))
@index_option
@k_option
@json_option
def similar(image: str, index_dir: str | None, k: int, as_json: bool) -> None:
    """Images nearest to IMAGE (any image file; an indexed one needs no model)."""
    with index_api.open(index_dir, create=False) as idx:
        hits = idx.similar(image, k=k)
        _notices(idx)
    _print_hits(hits, as_json)


@cli.command()
@index_option
@json_option
def info(index_dir: str | None, as_json: bool) -> None:
    """What the index holds: counts, model, size on disk, folders, last run."""
    with index_api.open(index_dir, create=False) as idx:
        data = idx.info()
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    click.echo(f"index       {data['index']}")
    click.echo(f"model       {data['model']} / {data['pretrained']} ({data['dim']}-d)")
    click.echo(f"images      {data['images']}  (errors: {data['errors']})")
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


def main() -> None:
    cli(prog_name="clipsearch")
