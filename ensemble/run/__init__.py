"""The run directory every stage reads and writes: its layout, its storage (a directory or a URI), its lock.

  layout   `Run`: every path inside a run, listing and reading models, the checks stages share
  storage  runs at a URI (s3://, gs://, file://): a local mirror synced with pyarrow
  lock     one writer per run (`run.lock`: host + pid, taken over when its process is gone)

No torch and no Ray here: trial processes, the stacking layer and the tests read runs through it.
"""

from ensemble.run.layout import Run, open_run, stage_of, stage_size, total_epochs
from ensemble.run.lock import locked
from ensemble.run.storage import is_uri, join, split

__all__ = ["Run", "is_uri", "join", "locked", "open_run", "split", "stage_of", "stage_size",
           "total_epochs"]
