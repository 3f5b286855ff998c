"""The sweep stage: `python -m ensemble.tune --space NAME` trains every backbone x param set x fold on Ray.

  schema    every key of a space: its default and check
  spaces    load (the checks across keys), resolve and freeze tune_spaces/*.yaml  (numpy sampling, no Ray)
  launch    plan a sweep (every check before the first write), write the plan, run Ray Tune
  trial     one Tune trial = one model: its k folds as Ray tasks   (no torch)
  train     train one fold: checkpoint every epoch, best-epoch OOF  (no Ray)
  progress  the compact display and the leaderboard
  cli       the command line                                      (python -m ensemble.tune)

Only `launch` and `trial` import Ray, and only when a sweep runs.
"""
