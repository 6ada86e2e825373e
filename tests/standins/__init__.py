"""Stand-ins for outside daemons the project talks to (none of them can be installed here)."""
