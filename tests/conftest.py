import contextlib
import os

import pytest

os.environ.setdefault("S2T_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "select2think"))


@pytest.fixture(scope="session")
def tiny_pair():
    from select2think import load_pair

    return load_pair("tiny-slm", "tiny-llm", dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(tiny_pair):
    return tiny_pair.tokenizer


@contextlib.contextmanager
def running(app):
    """An ASGI app served by uvicorn on a free loopback port in a thread: yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
