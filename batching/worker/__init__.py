"""The worker side: a bootstep that runs one batching consumer per batched task inside ``celery worker``.

The data path, top-down: ``bootstep`` starts a ``consumer`` per task; its fetch thread claims messages
(``..store``) and sorts them (``triage``) into a ``batch``; its model thread runs the batch (``runner``, within
``limits``); its keeper thread settles it (``keeper``: ``canvas`` follow-ups, ``results``, ``events``,
``metrics``) and finishes the claim. Imported by ``celery worker`` only, never by a client.
"""
