"""Many nodes, one shared tree (SPEC §12): one registrar per shared root, the same versions
everywhere.

Every node that mounts the same shared storage runs modelwatch. For each shared root one
node at a time holds a lease in a coordination backend (Redis or NATS JetStream Key-Value)
and watches, settles and registers it; the others do not scan it. Versions and every other
fact that decides an event (known fingerprints, removals) live in the backend and are
written with compare-and-set, so the same model version gets the same version number and
event id whichever node registers it, across takeovers.

    connect     the backend from `[cluster]` (the one place its connection is set up)
    backend     what the backend stores and the interface Redis and NATS implement
    redis, nats the two backends (aio: the event loop thread nats-py needs); memory: the
                same contract in one process, for tests
    codec       unit histories and event bodies as stored
    lease       when to acquire, renew, and fence (pure decisions)
    coordinator the thread that keeps the leases and tells the settle loop
    ledger      the settle loop's view of the histories it holds: commit, take over, acknowledge
    sharing     which roots are shared; report: what `status` says about the cluster
"""
