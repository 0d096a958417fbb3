"""The `bloomconv` command: a thin layer of click over the library.

Every command parses its arguments and calls one library function; `_errors_to_exit_codes` is
the one place that turns exceptions into messages and exit codes.
"""
from __future__ import annotations

import functools
import json
import sys

import click

from .errors import BloomconvError


def _progress_factory(quiet: bool):
    from tqdm import tqdm
    return functools.partial(tqdm, disable=quiet, leave=False, dynamic_ncols=True, file=sys.stderr)


def _errors_to_exit_codes(command):
    """Exit codes: 0 ok; 1 verification found problems; 2 bad input, unusable manifest,
    or anything else bloomconv refused (message on stderr, one line plus details)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BloomconvError as exc:
            click.echo(f"bloomconv: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("bloomconv: interrupted; re-run the same command to resume", err=True)
            sys.exit(130)
    return wrapper


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bloomconv")
def main():
    """Convert, quantize, verify and run BLOOM checkpoints."""


@main.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@quiet_option
@_errors_to_exit_codes
def convert(src, dst, quiet):
    """Reshard SRC into DST: one safetensors file per block, values unchanged, with a manifest.

    Re-run the same command after an interruption to resume."""
    from .converters.convert import convert as run
    manifest = run(src, dst, progress=_progress_factory(quiet))
    click.echo(f"{dst}: {len(manifest.files)} files, {sum(f.size for f in manifest.files):,} bytes")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--fast", is_flag=True, help="Check sizes and safetensors headers only (no hashing).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@quiet_option
@_errors_to_exit_codes
def verify(directory, fast, as_json, quiet):
    """Check every file of DIRECTORY against its manifest.

    Exit 0: all good; 1: files differ (each reported); 2: no usable manifest."""
    from .verify import verify as run
    report = run(directory, fast=fast, progress=_progress_factory(quiet or as_json))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    elif report.ok:
        mode = "sizes and headers" if fast else f"{report.bytes_hashed:,} bytes hashed"
        click.echo(f"{directory}: OK ({report.files_checked} files, {mode})")
    else:
        for problem in report.problems:
            click.echo(f"{directory}: {problem}", err=True)
        click.echo(f"{directory}: FAILED, {len(report.problems)} problem(s); copy the named files "
                   "again or re-run the conversion", err=True)
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_errors_to_exit_codes
def inspect(directory, as_json):
    """Show geometry, dtype, quantization and sizes of a converted DIRECTORY."""
    from .inspect import inspect as run
    info = run(directory)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    m = info["model"]
    quant = info["quantization"]
    click.echo(f"{info['directory']}  (bloomconv format {info['format_version']}, tool {info['tool_version']})")
    click.echo(f"  geometry      hidden {m['hidden_size']}, {m['n_layer']} blocks, {m['n_head']} heads, "
               f"vocab {m['vocab_size']}  ({info['parameters']:,} parameters)")
    click.echo(f"  dtype         {m['dtype']}")
    click.echo(f"  quantization  " + ("none" if not quant else
               ", ".join(f"{k}={v}" for k, v in quant.items() if v not in (None, False))))
    click.echo(f"  source        {info['source_layout']}, {info['source_bytes']:,} bytes")
    for f in info["files"]:
        click.echo(f"  {f['size']:>15,}  {f['name']}")
    click.echo(f"  {info['total_bytes']:>15,}  total ({info['weight_bytes']:,} in weights)")


@main.command("example")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--geometry", default="tiny", show_default=True,
              help="tiny | small | bloom-560m, or HIDDEN,LAYERS,HEADS,VOCAB")
@click.option("--layout", default="release-pickle-shards", show_default=True,
              type=click.Choice(["release-pickle-shards", "safetensors-shards", "pickle-single", "safetensors-single"]))
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float16", "float32"]))
@click.option("--seed", default=0, show_default=True)
@_errors_to_exit_codes
def example(dst, geometry, layout, dtype, seed):
    """Write a random-weight BLOOM checkpoint to DST, laid out like a release (for trying bloomconv)."""
    import torch

    from .converters.example import write_example_checkpoint
    dims = geometry if "," not in geometry else tuple(int(x) for x in geometry.split(","))
    write_example_checkpoint(dst, dims, layout, getattr(torch, dtype), seed)
    click.echo(f"{dst}: random BLOOM ({geometry}, {dtype}) in the {layout} layout")


if __name__ == "__main__":
    main()
