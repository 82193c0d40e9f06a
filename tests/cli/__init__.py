"""Tests of the command line as a whole: flags, help, errors, start-up time, the package's structure, end to end."""
