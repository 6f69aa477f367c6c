"""Errors that mean "your input is wrong", reported by the command line as one line, without a traceback."""


class UserError(ValueError):
  """Bad input from the user: a config, a file, a command-line flag. Its message is the whole report."""


class ConfigError(UserError):
  """A config that cannot run (on this mesh, with this data, with this model), found before any compile."""


class DataError(UserError):
  """Bad data, as one line `file:line: field: problem`."""
