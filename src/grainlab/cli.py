"""The `grainlab` command: one verb group per area.

Thin by design: parse the arguments, load params.yaml, call the library, write outputs.
Each area registers its verbs in its own `commands.py`. A GrainlabError (or an OS error
such as a full disk) prints one line naming the problem and exits with status 2; a password
in a URL it quotes is masked.
"""

from __future__ import annotations

import argparse
import errno
import sys

from grainlab.config import load_params
from grainlab.errors import GrainlabError


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

    print(f"grainlab: error: {mask_url(message)}", file=sys.stderr)


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
