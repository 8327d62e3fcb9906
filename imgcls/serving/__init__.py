"""The inference server behind jobs/serve.py (see app.py for the routes).

    app.py         the routes, the server state, the request metrics
    v2.py          the Open Inference Protocol v2 routes (tritonclient.http works unchanged)
    protocol.py    the v2 tensor codec: JSON and binary tensors in, response bytes out
    repository.py  one model file or a Triton-style folder of versions; traffic splits; reload
    batching.py    dynamic batching of single images from concurrent requests
    monitor.py     live quality over a sliding window beside the export's reference; alerts
    guards.py      body limit and read deadlines, bounded decoding, 503 when the queue is full
    page.html      the page at GET /
"""
from imgcls.serving.app import Options, create_app

__all__ = ["Options", "create_app"]
