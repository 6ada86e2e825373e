"""The fanotify pre-content protocol (Linux 6.14+): a group, marks, events, responses.
Nothing here knows of EROFS, chunks or where bytes come from."""
