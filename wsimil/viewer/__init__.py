"""``wsimil review``: a local web app for pathologists to review a cohort's heatmaps.

- :mod:`.cohort`: what may be served (the manifest's slides and their heatmap records only);
- :mod:`.deepzoom`: Deep Zoom tiles of a slide (OpenSlide's ``DeepZoomGenerator``, or any
  wsimil reader) and of its attention overlay, made on demand;
- :mod:`.pages`: the HTML of the slide list and of the viewer page;
- :mod:`.app`: the Flask app tying them together; :mod:`.serve`: a run folder -> its app;
- ``static/``: the page's script and style, and the vendored OpenSeadragon (see
  ``static/openseadragon/VENDORED.md``).

Nothing here is imported by the pipeline stages; ``wsimil review`` imports it when it runs.
"""
