"""Errors that mean "your input is wrong", reported by the command line as one line, without a traceback."""


class UserError(ValueError):
  """Bad input from the user: a config, a file, a command-line flag. Its message is the whole report."""


class ConfigError(UserError):
  """A config that cannot run (on this mesh, with this data, with this model), found before any compile."""


class DataError(UserError):
  """Bad data, as one line `file:line: field: problem`."""


class Preempted(Exception):
  """SIGTERM arrived: the run saved a checkpoint at `step` and stops; the same command resumes it.

  An exception rather than a return, so that nothing above a stage (the lab pipeline) can mistake a
  preempted stage for a finished one.
  """

  def __init__(self, step: int):
    super().__init__(f"preempted (SIGTERM) at step {step}: checkpoint saved; rerun the same command to resume")
    self.step = step
