"""Local training of virtual clients (runs on the node that holds the users' data)."""
