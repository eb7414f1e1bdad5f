"""The Redis side of batched queues: keys, the queue store and its Lua scripts, riding out outages.

Nothing here imports the task, the client or the worker: they all build on it.
"""
