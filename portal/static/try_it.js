// The device page's "Try it": POST the message (with the form's CSRF token), read the answer
// as Server-Sent Events from the response body (EventSource can only GET) and show it live.
(function () {
  "use strict";
  var form = document.querySelector("[data-try-form]");
  if (!form || !window.fetch || !window.TextDecoder) { return; }
  var card = form.parentElement;
  var labels = JSON.parse(card.querySelector("[data-try-labels]").textContent);
  var submit = form.querySelector("[data-try-submit]");
  var state = form.querySelector("[data-try-state]");
  var result = card.querySelector("[data-try-result]");
  var answer = card.querySelector("[data-try-answer]");
  var error = card.querySelector("[data-try-error]");
  var summary = card.querySelector("[data-try-summary]");
  var fill = function (text, values) {
    return text.replace(/\{(\w+)\}/g, function (all, name) {
      return values[name] === undefined ? all : String(values[name]);
    });
  };
  var round = function (ms) { return ms === null || ms === undefined ? "—" : String(Math.round(ms)); };

  var sentAt = 0;
  var firstDeltaAt = null;
  var terminal = null;

  var showError = function (text) {
    error.textContent = text;
    error.hidden = false;
  };
  var showSummary = function (message) {
    var usage = message.usage;
    var finish = message.type === "end" ? message.finish : "error";
    summary.querySelector("[data-try-finish]").textContent = finish;
    summary.querySelector("[data-try-finish-label]").textContent = labels.finishes[finish] || "";
    var platform = message.timing ? message.timing.first_delta_ms : null;
    summary.querySelector("[data-try-first]").textContent = firstDeltaAt === null
      ? labels.no_delta
      : fill(labels.first_delta, {platform: round(platform), here: round(firstDeltaAt - sentAt)});
    summary.querySelector("[data-try-usage]").textContent = usage
      ? fill(labels.usage, {input: usage.input_tokens, output: usage.output_tokens,
                            credits: usage.credits})
      : "—";
    summary.hidden = false;
  };
  var handle = function (message) {
    if (message.type === "start") {
      state.textContent = labels.streaming;
    } else if (message.type === "delta") {
      if (firstDeltaAt === null) { firstDeltaAt = performance.now(); }
      answer.textContent += message.text;
    } else if (message.type === "end" || message.type === "error") {
      terminal = message;
      if (message.type === "error") {
        showError((labels.errors[message.code] || message.message) + " (" + message.code + ")");
      }
      showSummary(message);
      state.textContent = message.type === "end" ? labels.done : labels.failed;
    }
  };
  // One SSE block: "event: ...\ndata: {...}"; only the data line matters (it names its type).
  var parseBlock = function (block) {
    var data = block.split("\n").filter(function (line) { return line.indexOf("data:") === 0; })
      .map(function (line) { return line.slice(5).trim(); }).join("\n");
    if (data) { handle(JSON.parse(data)); }
  };
  var read = function (response) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    var pump = function () {
      return reader.read().then(function (chunk) {
        if (chunk.done) { return; }
        buffer += decoder.decode(chunk.value, {stream: true});
        var end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          parseBlock(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
        return pump();
      });
    };
    return pump();
  };

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (!form.reportValidity()) { return; }
    submit.disabled = true;
    answer.textContent = "";
    error.hidden = true;
    summary.hidden = true;
    result.hidden = false;
    state.textContent = labels.sending;
    firstDeltaAt = null;
    terminal = null;
    sentAt = performance.now();
    fetch(form.action, {method: "POST", body: new FormData(form), credentials: "same-origin",
                        headers: {Accept: "text/event-stream"}})
      .then(function (response) {
        var type = response.headers.get("Content-Type") || "";
        if (!response.ok || type.indexOf("text/event-stream") !== 0) {
          var status = String(response.status);
          throw {shown: labels.http[status] || fill(labels.http.other, {status: status})};
        }
        return read(response);
      })
      .then(function () {
        if (terminal === null) { throw {shown: labels.failed}; }
      })
      .catch(function (failure) {  // ours carry the text to show; a lost connection does not
        showError(failure && failure.shown ? failure.shown : labels.failed);
        state.textContent = labels.failed;
      })
      .then(function () { submit.disabled = false; });
  });
  submit.disabled = false;
})();
