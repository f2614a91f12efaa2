"""Process helpers shared by the service's processes and the REST gateway's.

``procutil.process``: dying with the parent, freezing the start-up heap.
``procutil.cpu``: the CPU scheduling policy and CPU affinity of a process.
``procutil.logs``: the log format every process shares (text or JSON lines).
It imports nothing from ``service`` or ``gateway``, so either side can be
deployed and read on its own.
"""
