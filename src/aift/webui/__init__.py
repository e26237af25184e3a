"""`aift webui`: a browser studio over aift's library (app.py and routes/: the JSON API; static/index.html: the page)."""
