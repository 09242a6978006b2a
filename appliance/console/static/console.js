// The console's only script (CSP: script-src 'self'; nothing inline).
// 1. Live refresh: an element with data-refresh="URL" data-every="ms" re-fetches that HTML
//    fragment and swaps its content in place, no full reload. A fetch that lands on the login
//    page (the session ended) sends the whole page there.
// 2. Confirmation: a form with data-confirm="question" asks before it submits. (The kill switch
//    does not rely on this: it has a confirmation page that works without any script.)
(function () {
  "use strict";

  function busy(element) {
    // Never swap under the operator's hand: a focused control or a pressed button inside.
    var active = document.activeElement;
    return element.contains(active) && active !== document.body && active.tagName !== "A" ||
      element.dataset.pressed === "1";
  }

  function refresh(element) {
    var url = element.dataset.refresh;
    var every = parseInt(element.dataset.every || "2000", 10);
    var inFlight = false;
    var last = null;
    element.addEventListener("pointerdown", function () { element.dataset.pressed = "1"; });
    document.addEventListener("pointerup", function () { element.dataset.pressed = ""; });

    function tick() {
      if (inFlight || document.hidden) { return; }
      inFlight = true;
      // X-Console-Poll: a background refresh, which does not keep the session from idling out
      var headers = { "X-Requested-With": "console", "X-Console-Poll": "1" };
      fetch(url, { credentials: "same-origin", headers: headers })
        .then(function (response) {
          var loggedOut = response.status === 401 ||
            response.redirected && new URL(response.url).pathname === "/login";
          if (loggedOut) {  // the session ended: log in again, then back to this page
            window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
            return null;
          }
          return response.ok ? response.text() : null;
        })
        .then(function (html) {
          if (html !== null && html !== last && !busy(element)) {
            element.innerHTML = html;
            last = html;
            element.dispatchEvent(new CustomEvent("console:refreshed", { bubbles: true }));
          }
        })
        .catch(function () { /* the next tick tries again */ })
        .then(function () { inFlight = false; });
    }

    window.setInterval(tick, Math.max(250, every));
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm) {
      if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); }
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    var elements = document.querySelectorAll("[data-refresh]");
    for (var i = 0; i < elements.length; i++) { refresh(elements[i]); }
  });
})();
