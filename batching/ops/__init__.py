"""What an operator or a script does to batched queues from outside the worker: read their status, handle dead
letters. Each function takes the batched task and opens the queue on its app's own broker settings."""
