// wsimil review: one slide in OpenSeadragon with its attention overlay, top tiles and scale bar.
(function () {
  "use strict";
  var info = JSON.parse(document.getElementById("slide-info").textContent);
  var sid = encodeURIComponent(info.slide_id);
  var $ = function (id) { return document.getElementById(id); };
  var hasOverlay = Object.keys(info.maps).length > 0;
  var sources = ["/dzi/" + sid + ".dzi"];
  if (hasOverlay) { // opened with the slide, in parallel
    sources.push({ tileSource: overlayUrl(), x: 0, y: 0, width: 1, opacity: opacity() });
  }
  var viewer = OpenSeadragon({
    id: "osd",
    prefixUrl: "/static/openseadragon/images/",
    tileSources: sources,
    sequenceMode: false,
    immediateRender: true, // the view's own level first: fewer tiles on the first view
    maxTilesPerFrame: 8, // ask for the view's tiles at once (default: one per frame)
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 2,
    visibilityRatio: 0.5,
    animationTime: 0.6,
    gestureSettingsMouse: { clickToZoom: false },
  });
  window.wsimilViewer = viewer; // for tests and the console
  var overlayImage = null;

  function opacity() { return $("opacity") ? $("opacity").value / 100 : 0; }

  function overlayUrl() {
    return "/overlay/" + sid + "/" + encodeURIComponent($("map").value) + "/" +
      encodeURIComponent($("scale").value) + ".dzi";
  }

  function loadOverlay() {
    if (!hasOverlay) { return; }
    var old = overlayImage;
    viewer.addTiledImage({
      tileSource: overlayUrl(),
      x: 0, y: 0, width: 1,
      opacity: $("overlay-on").checked ? opacity() : 0,
      success: function (e) {
        overlayImage = e.item;
        if (old) { viewer.world.removeItem(old); }
        document.body.dataset.overlay = $("map").value + "/" + $("scale").value;
      },
    });
  }

  function setOpacity() {
    if (overlayImage) { overlayImage.setOpacity($("overlay-on").checked ? opacity() : 0); }
    document.body.dataset.overlayVisible = $("overlay-on").checked ? "1" : "0";
  }

  // Top tiles: outlined on the slide, and each a button that pans and zooms there.
  function goTo(t) {
    var slide = viewer.world.getItemAt(0);
    var pad = t.size; // one tile of context on each side
    var r = slide.imageToViewportRectangle(t.x - pad, t.y - pad, t.size + 2 * pad, t.size + 2 * pad);
    viewer.viewport.fitBounds(r);
  }

  function addTopOutlines() {
    var slide = viewer.world.getItemAt(0);
    info.top.forEach(function (t) {
      var el = document.createElement("div");
      el.className = "top-outline";
      el.id = "top-" + t.rank;
      el.title = "#" + t.rank + " attention " + t.attention.toPrecision(3);
      el.textContent = t.rank;
      viewer.addOverlay({ element: el, location: slide.imageToViewportRectangle(t.x, t.y, t.size, t.size) });
      new OpenSeadragon.MouseTracker({ element: el, clickHandler: function () { goTo(t); } });
    });
    Array.prototype.forEach.call(document.querySelectorAll("button.top"), function (b) {
      var t = info.top.filter(function (x) { return String(x.rank) === b.dataset.rank; })[0];
      b.addEventListener("click", function () { goTo(t); });
    });
  }

  // Scale bar: a round length in µm (or mm) about 120 px long at the current zoom.
  function updateScaleBar() {
    if (!info.mpp || !viewer.world.getItemCount()) { $("scalebar").hidden = true; return; }
    var slide = viewer.world.getItemAt(0);
    var screenPxPerImagePx = slide.viewportToImageZoom(viewer.viewport.getZoom(true));
    var umPerScreenPx = info.mpp / screenPxPerImagePx;
    var target = 120 * umPerScreenPx;
    var exp = Math.pow(10, Math.floor(Math.log10(target)));
    var um = [5, 2, 1].map(function (m) { return m * exp; }).filter(function (v) { return v <= target; })[0] || exp;
    $("scalebar-bar").style.width = Math.round(um / umPerScreenPx) + "px";
    $("scalebar-text").textContent = um >= 1000 ? (um / 1000) + " mm" : um + " µm";
  }

  viewer.addHandler("open", function () {
    addTopOutlines();
    if (hasOverlay) {
      overlayImage = viewer.world.getItemAt(1);
      document.body.dataset.overlay = $("map").value + "/" + $("scale").value;
    }
    updateScaleBar();
    document.body.dataset.ready = "1";
  });
  viewer.addHandler("animation", updateScaleBar);
  viewer.addHandler("animation-finish", function () { updateScaleBar(); document.body.dataset.moved = String(Date.now()); });
  if ($("map")) {
    $("map").addEventListener("change", loadOverlay);
    $("scale").addEventListener("change", function () {
      $("colourbar").src = "/legend/" + encodeURIComponent($("scale").value) + ".png";
      loadOverlay();
    });
    $("opacity").addEventListener("input", setOpacity);
    $("overlay-on").addEventListener("change", setOpacity);
  }
})();
