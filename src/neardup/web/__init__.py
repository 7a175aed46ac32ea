"""The web adapter: a FastAPI app (JSON API + one offline page) over the Index API.

`neardup.web.app` imports FastAPI (the `neardup[serve]` extra); `neardup.web.thumbnails` needs only
Pillow, so the static HTML report can share it without the server's dependencies.
"""
