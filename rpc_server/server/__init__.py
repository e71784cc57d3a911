"""Server processes: listening sockets, connection limits, the graceful drain, several
processes under gunicorn."""
