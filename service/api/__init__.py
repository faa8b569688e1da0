"""HTTP edge of the service: FastAPI routers, error shape, middlewares, upload checks.

The engine never imports this package; routers here call the engine and translate its
outcomes into HTTP (status codes, the error shape of `errors.py`, headers).
"""
