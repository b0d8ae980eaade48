"""The daemon's ops, one module per concern, all registered in one table.

``table`` holds the op table (``op`` decorator, ``_OPS``), what an op is handed
(``Context``) and the argument checks every op shares; ``stats`` the request statistics
kept per registered op. The op groups register themselves when imported: ``control``
(ping, hello, status, ps, register_roots, unload, shutdown, shm_register, echo), ``vae``,
``clip``, ``uploads`` (the Checkpoint Tunnel's state dicts) and ``lora``.

``luna_daemon.service`` imports every group before it defines ``Service``, so importing
``luna_daemon.service`` is what guarantees a complete table (tests/test_service_ops.py).
The op modules never import ``luna_daemon.service`` at run time: the service is handed to
each op as its first argument, so there is no import cycle to order around.
"""
