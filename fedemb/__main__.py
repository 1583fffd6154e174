"""`python -m fedemb`: the fedemb command line."""

from fedemb.cli import main

main()
