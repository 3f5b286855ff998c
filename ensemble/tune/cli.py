"""The sweep's command line: `python -m ensemble.tune --space NAME [--resume] ...` (ensemble.tune.launch)."""

from __future__ import annotations

import argparse

from ensemble import trackers
from ensemble.errors import cli_main, command_line
from ensemble.run import is_uri, join
from ensemble.tune import launch, spaces
from ensemble.tune.progress import print_leaderboard


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.tune",
                                description="Train every backbone x param set x fold of a space on Ray Tune.")
    p.add_argument("--space", required=True, help="a name in tune_spaces/ or a path to a .yaml file")
    p.add_argument("--storage", default="runs",
                   help="directory holding runs, or a URI pyarrow opens (s3://bucket/runs, gs://..., file://...) [runs]")
    p.add_argument("--name", help="run name [the space name, with -smoke under --smoke]")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch, small images: a quick end-to-end check")
    p.add_argument("--gpus-per-trial", help="GPUs per fold worker, or auto: measured per model (overrides resources.gpu)")
    p.add_argument("--max-concurrent", type=int, help="models in flight at once [from the cluster size]")
    p.add_argument("--address", help="join an existing Ray cluster, e.g. 'auto'")
    p.add_argument("--logger", action="append", default=[], choices=sorted(trackers.TRACKERS),
                   help="also log to this experiment tracker (repeatable; offline, inside the run; kept for --resume, "
                        "stack and report)")
    p.add_argument("-v", "--verbose", type=int, default=1,
                   help="0: the leaderboard only; 1: a line per model [default]; 2: also Ray Tune's tables and logs")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    space = spaces.load_space(args.space)
    if args.smoke:
        stand_in = space.smoke.backbone
        space = spaces.apply_smoke(space)
        if space.backbones == [stand_in]:
            print(f"--smoke: training the tiny stand-in backbone {stand_in!r} instead of the space's backbones.")
    trackers.check_installed(args.logger)
    if args.gpus_per_trial is not None:
        space = spaces.with_resources(space, gpu=args.gpus_per_trial)
    name = args.name or (space.name + ("-smoke" if args.smoke else ""))
    location = join(args.storage, name)
    command = command_line("python -m ensemble.tune", argv)
    board = launch.run_sweep(space, location, resume=args.resume, smoke=args.smoke,
                             max_concurrent=args.max_concurrent, address=args.address, verbose=args.verbose,
                             command=command, loggers=args.logger)
    where = join(location, "leaderboard.csv") if is_uri(location) else (location / "leaderboard.csv").resolve()
    print_leaderboard(board, f"{where}; models in {join(location, 'models') if is_uri(location) else where.parent / 'models'}/")
    return 0
