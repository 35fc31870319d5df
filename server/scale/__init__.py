"""Scale-out on Ray Serve: an ingress deployment serving the same FastAPI app, engine replicas behind it.

`app.py` builds the Serve application (`serve run` imports `build_app`), `replica.py` is one engine replica,
`router.py` routes by image content, `remote_engine.py` is the ingress's engine (calls into the replicas),
`metrics_board.py` gathers every replica's metrics, `launch.py` is `vlmserve serve --replicas N`. Ray is an
optional dependency (`pip install "vlmserve[ray]"`): nothing outside this package imports it.
"""
