"""What kvbm does in the processes it runs in (vLLM's processes and the servers serve starts).

- ``cpu_features``: CPU feature permissions (AMX tiles) a process must request before vLLM runs.
- ``threads``: threads kvbm starts inside an engine's process, free of the engine's core binding.
- ``parent_watch``: a worker server exits when the process that started it dies, even by SIGKILL.
"""
