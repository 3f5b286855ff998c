"""The report stage: one self-contained HTML page per run (`python -m ensemble.report --run runs/NAME`).

  collect  everything the page shows, read from the run's files into plain dataclasses (every input optional)
  figures  each figure a function of arrays that returns PNG bytes    (matplotlib, Agg)
  page     which sections the inputs support; index.html from templates/report.html.j2, PNGs, leaderboard.csv
  cli      the command line: report/ written as one directory swapped in    (python -m ensemble.report)
"""
