"""The fanotify pre-content kernel path: frontend, cache files, event journal, keeper, culling.

Importing this package imports nothing else of it: the keeper process and the lifecycle's
carriers import `keeper` alone."""
