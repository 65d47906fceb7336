"""The `grainlab` command: one verb group per area.

Thin by design: parse the arguments, load params.yaml, call the library, write outputs.
Each area registers its verbs in its own `commands.py`. A GrainlabError (or an OS error
such as a full disk) prints one line naming the problem and exits with status 2; a password
in a URL it quotes is masked, and the line is cut to MAX_ERROR_CHARS.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys

from grainlab.config import load_params
from grainlab.errors import GrainlabError, clip, short

MAX_ERROR_CHARS = 500  # an error line is never longer
PIXEL_SIZE_NM = (1e-3, 1e6)  # a physically sensible pixel size: 1 pm to 1 mm


def common_options() -> argparse.ArgumentParser:
    """Options every leaf command takes: the params file, its profile and key=value overrides."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("settings")
    g.add_argument(
        "--params", default="params.yaml", metavar="FILE", help="params file (default: %(default)s)"
    )
    g.add_argument("--profile", default=None, help="settings profile: demo (default) or paper")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set tem.image_px=512 (repeatable)",
    )
    return p


def params_from(args):
    return load_params(args.params, args.overrides, args.profile)


def check_pixel_size(value, what: str = "--pixel-size") -> float | None:
    """A pixel size in nm from the command line (None: not given), checked before anything is written."""
    if value is None:
        return None
    lo, hi = PIXEL_SIZE_NM
    try:
        nm = float(value)
    except (TypeError, ValueError):
        nm = math.nan
    if not (math.isfinite(nm) and lo <= nm <= hi):
        raise GrainlabError(
            f"{what} = {short(value)}: expected the pixel size in nanometres, a number between {lo:g} "
            f"and {hi:.0f} nm (1 mm)"
        )
    return nm


def build_parser() -> argparse.ArgumentParser:
    from grainlab import commands as platform_commands
    from grainlab.boundaries import commands as boundary_commands
    from grainlab.datasets import commands as data_commands
    from grainlab.recognition import commands as recognition_commands

    parser = argparse.ArgumentParser(
        prog="grainlab",
        description="Deep learning experiments on metal microstructure images: grain-boundary "
        "tracing (U-Net) and microstructure recognition (triplet network + open-set GMM).",
    )
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    common = common_options()
    for module in (data_commands, boundary_commands, recognition_commands, platform_commands):
        module.register(groups, common)
    return parser


def _error(message: str):
    """Print one error line; a password in any URL it quotes (e.g. from MLflow's own message) is masked."""
    from grainlab.tracking import mask_url

    print(f"grainlab: error: {clip(mask_url(message), MAX_ERROR_CHARS - 17)}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except GrainlabError as exc:
        _error(str(exc))
        return 2
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM, errno.ENOENT):
            where = f"{exc.filename}: " if exc.filename else ""
            _error(f"{where}{exc.strerror}")
            return 2
        raise
    except KeyboardInterrupt:
        print("grainlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
