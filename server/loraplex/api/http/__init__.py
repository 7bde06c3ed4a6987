"""The OpenAI-compatible HTTP front: protocol.py (bodies <-> engine objects), app.py (Starlette
routes), server.py (uvicorn on the gRPC server's event loop). It shares everything below the front
doors with gRPC: api/generation.py, adapter_ops.py, auth.py, concurrency.py, status.py, convert.py.
"""
