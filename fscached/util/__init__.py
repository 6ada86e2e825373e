"""Small helpers every part of the project shares (mount table, atomic files, ids, units, build
information). This package imports nothing else of the project: anything may import it."""
