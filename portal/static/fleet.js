// The device list: live counts at the top, and selecting rows for a bulk action.
(function () {
  "use strict";
  var POLL_MS = 5000;

  // Counts: GET the summary (total, online, by_status) every few seconds while the tab is
  // visible; stop for good when the answer is not JSON (the session ended).
  var summary = document.querySelector("[data-fleet-summary]");
  if (summary && window.fetch) {
    var url = summary.dataset.fleetSummary;
    var timer = null;
    var show = function (selector, value) {
      var element = summary.querySelector(selector);
      if (element && value !== undefined && element.textContent !== String(value)) {
        element.textContent = String(value);
      }
    };
    var poll = function () {
      timer = null;
      fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}})
        .then(function (response) {
          var json = (response.headers.get("Content-Type") || "").indexOf("json") >= 0;
          if (!response.ok || !json) { throw new Error("no summary"); }
          return response.json();
        })
        .then(function (data) {
          show("[data-fleet-count=online]", data.online);
          show("[data-fleet-count=total]", data.total);
          Object.keys(data.by_status || {}).forEach(function (status) {
            show('[data-fleet-status="' + status + '"]', data.by_status[status]);
          });
          schedule();
        })
        .catch(function () { summary.dataset.fleetSummaryStopped = "true"; });
    };
    var schedule = function () {
      if (timer === null && !document.hidden) { timer = setTimeout(poll, POLL_MS); }
    };
    document.addEventListener("visibilitychange", function () {
      if (document.hidden && timer !== null) { clearTimeout(timer); timer = null; }
      if (!document.hidden && summary.dataset.fleetSummaryStopped !== "true") { poll(); }
    });
    schedule();
  }

  // Bulk actions: "select all" on this page, the count, and the group field for "move".
  var form = document.querySelector("[data-testid=bulk-form]");
  if (!form) { return; }
  var boxes = form.querySelectorAll("input[name=device_ids]");
  var all = form.querySelector("[data-select-all]");
  var count = form.querySelector("[data-bulk-count]");
  var action = form.querySelector("#bulk-action");
  var group = form.querySelector("[data-bulk-group]");
  var update = function () {
    var selected = Array.prototype.filter.call(boxes, function (b) { return b.checked; }).length;
    if (count) { count.textContent = String(selected); }
    if (all) {
      all.checked = selected > 0 && selected === boxes.length;
      all.indeterminate = selected > 0 && selected < boxes.length;
    }
  };
  boxes.forEach(function (box) { box.addEventListener("change", update); });
  if (all) {
    all.addEventListener("change", function () {
      boxes.forEach(function (box) { box.checked = all.checked; });
      update();
    });
  }
  if (action && group) {
    var toggle = function () { group.hidden = action.value !== "move_group"; };
    action.addEventListener("change", toggle);
    toggle();
  }
  update();
})();
