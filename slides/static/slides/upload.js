/*
 * The resumable upload of a whole-slide image (slides/_upload_widget.html), over the API's
 * protocol (slides/api.py): POST the file's name and size to the case, then PATCH its bytes in
 * pieces from the server's offset. A dropped connection or a 5xx is retried with backoff, each
 * time asking the server where the upload stands (GET) and going on from there. The upload's id is
 * kept in localStorage under the case and the file's name, size and date, so that choosing the
 * same file after a reload (or a crash) resumes instead of starting over. Nothing heavy runs here:
 * the server checks the file (no SHA-256 of gigabytes in the browser).
 *
 * The widget's data attributes: data-case, data-start-url (POST), data-upload-url and
 * data-slide-url (the API's URLs for the upload and the slide with a placeholder id: an all-zero
 * UUID and 0), data-piece-bytes (optional: at most this many bytes a piece; the default is the
 * server's piece_max_bytes, at most 8 MiB). The widget's data-state says where it stands
 * (idle, uploading, retrying, analysing, done, failed, error, cancelled), for whoever wants to know.
 */
(function () {
  "use strict";

  var PIECE_MAX_BYTES = 8 * 1024 * 1024;
  var BACKOFF_FIRST_MS = 1000;
  var BACKOFF_MAX_MS = 30000;
  var PIECE_TIMEOUT_MS = 5 * 60 * 1000;  // 8 MiB at 28 KB/s
  var POLL_MS = 2000;
  var SPEED_WINDOW_MS = 10000;
  var UPLOAD_PLACEHOLDER = "00000000-0000-0000-0000-000000000000";

  var root = document.getElementById("slide-upload");
  if (!root) return;
  var input = document.getElementById("slide-file");
  var startButton = document.getElementById("slide-upload-start");
  var cancelButton = document.getElementById("slide-upload-cancel");
  var note = document.getElementById("slide-upload-note");
  var progressBox = document.getElementById("slide-upload-progress");
  var bar = document.getElementById("slide-upload-bar");
  var figures = document.getElementById("slide-upload-figures");
  var statusLine = document.getElementById("slide-upload-status");
  var errorBox = document.getElementById("slide-upload-errors");
  var errorLine = document.getElementById("slide-upload-error");
  var result = document.getElementById("slide-upload-result");
  var csrfToken = root.querySelector("input[name=csrfmiddlewaretoken]").value;

  var current = null;  // the upload under way: {file, id, size, offset, piece, stopped, ...}
  var SIGNED_OUT = "You are no longer signed in (or this page is out of date): sign in again, open this page and " +
    "choose the same file; the upload goes on from where it stopped.";
  var GONE = "This upload is no longer on the server (expired or cancelled): choose the file again to start over.";

  // ---- helpers ----------------------------------------------------------------------------

  var uploadUrl = function (id) { return root.dataset.uploadUrl.replace(UPLOAD_PLACEHOLDER, id); };
  var slideUrl = function (id) { return root.dataset.slideUrl.replace(/\/0\/$/, "/" + id + "/"); };

  var storageKey = function (file) {
    return ["cloudiopsy:slide-upload", root.dataset.case, file.name, file.size, file.lastModified].join(":");
  };
  // localStorage can be off (a private window, a policy): the upload works, it just cannot resume after a reload.
  var remember = function (file, id) { try { localStorage.setItem(storageKey(file), id); } catch (e) { /* no resume */ } };
  var recall = function (file) { try { return localStorage.getItem(storageKey(file)); } catch (e) { return null; } };
  var forget = function (file) { try { localStorage.removeItem(storageKey(file)); } catch (e) { /* nothing kept */ } };

  var bytes = function (n) {
    var units = ["bytes", "KB", "MB", "GB", "TB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  };
  var duration = function (seconds) {
    if (seconds < 90) return Math.max(1, Math.round(seconds)) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  };
  var sleep = function (ms, session) {
    // Woken early when the browser says it is back online, or when the upload is cancelled.
    return new Promise(function (resolve) {
      var timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        window.removeEventListener("online", done);
        if (session) session.wake = null;
        resolve();
      }
      window.addEventListener("online", done);
      if (session) session.wake = done;
    });
  };

  var setState = function (state) { root.dataset.state = state; };
  var say = function (text) { statusLine.textContent = text; };
  var showError = function (text) {
    errorLine.textContent = text;
    errorBox.hidden = !text;
  };
  var busy = function (uploading) {
    input.disabled = uploading;
    startButton.disabled = uploading || !input.files.length;
    cancelButton.hidden = !uploading;
  };

  // A response's problem-details message, or a fallback.
  var detailOf = function (response, fallback) {
    return response.json().then(
      function (body) { return (body && (body.detail || body.error)) || fallback; },
      function () { return fallback; }
    );
  };

  var api = function (method, url, options) {
    options = options || {};
    var headers = Object.assign({Accept: "application/json"}, options.headers || {});
    if (method !== "GET" && method !== "HEAD") headers["X-CSRFToken"] = csrfToken;
    return fetch(url, {
      method: method,
      credentials: "same-origin",
      cache: "no-store",
      headers: headers,
      body: options.body,
      signal: options.signal
    });
  };

  // ---- progress ---------------------------------------------------------------------------

  var showProgress = function (session) {
    var now = performance.now();
    session.samples.push([now, session.offset]);
    while (session.samples.length > 2 && now - session.samples[0][0] > SPEED_WINDOW_MS) session.samples.shift();
    var first = session.samples[0];
    var seconds = (now - first[0]) / 1000;
    var speed = seconds > 0.2 ? (session.offset - first[1]) / seconds : 0;
    progressBox.hidden = false;
    bar.max = session.size;
    bar.value = session.offset;
    var percent = Math.floor((100 * session.offset) / session.size);
    var text = bytes(session.offset) + " of " + bytes(session.size) + " · " + percent + "%";
    if (speed > 0) {
      text += " · " + bytes(Math.round(speed)) + "/s";
      if (session.offset < session.size) text += " · about " + duration((session.size - session.offset) / speed) + " left";
    }
    figures.textContent = text;
    root.dataset.offset = String(session.offset);
  };

  // ---- the upload -------------------------------------------------------------------------

  var pieceBytes = function (serverMax) {
    var size = Math.min(serverMax || PIECE_MAX_BYTES, PIECE_MAX_BYTES);
    var wanted = parseInt(root.dataset.pieceBytes || "", 10);
    return wanted > 0 ? Math.min(size, wanted) : size;
  };

  // Where an upload stands on the server: its JSON; {status: "gone"} (404) or {status: "refused",
  // code} for another 4xx; null when the network is down or a 5xx came back.
  var askServer = function (id) {
    return api("GET", uploadUrl(id)).then(
      function (response) {
        if (response.status >= 500) return null;
        if (response.status === 404) return {status: "gone"};
        if (!response.ok) return {status: "refused", code: response.status};
        return response.json();
      },
      function () { return null; }
    );
  };

  // The unfinished upload of this file to this case (same name, size and date) that the server
  // still holds, or null. An upload the server finished, refused or dropped is forgotten.
  var unfinished = function (file) {
    var id = recall(file);
    if (!id) return Promise.resolve(null);
    return askServer(id).then(function (upload) {
      if (upload === null || upload.status === "refused") return null;  // cannot tell now: keep it
      if (upload.status === "receiving" && upload.size === file.size) return upload;
      forget(file);
      return null;
    });
  };

  var stop = function (session, state, message) {
    session.stopped = true;
    current = null;
    setState(state);
    busy(false);
    say("");
    showError(message || "");
  };

  var finished = function (session, upload) {
    forget(session.file);
    session.stopped = true;
    current = null;
    busy(false);
    startButton.disabled = true;
    session.offset = session.size;
    showProgress(session);
    say("");
    showResult(upload.slide);
  };

  // After a network error or a 5xx: wait (longer each time), ask the server where the upload
  // stands, and go on from there. It stops only on Cancel or when the server refuses for good.
  var recover = function (session, why) {
    session.failures += 1;
    var wait = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * Math.pow(2, session.failures - 1));
    setState("retrying");
    say(why + " Retrying in " + duration(wait / 1000) + " (attempt " + session.failures +
      "); the upload goes on from where the server has it.");
    return sleep(wait, session).then(function () {
      if (session.stopped) return null;
      return askServer(session.id).then(function (upload) {
        if (session.stopped) return null;
        if (upload === null) return recover(session, "The server cannot be reached.");
        if (upload.status === "refused") {
          return stop(session, "error", upload.code === 401 || upload.code === 403 ? SIGNED_OUT :
            "The server would not say where the upload stands (HTTP " + upload.code + ").");
        }
        if (upload.status === "complete") return finished(session, upload);
        if (upload.status !== "receiving") {
          forget(session.file);
          return stop(session, "error", upload.error || GONE);
        }
        session.offset = upload.offset;
        setState("uploading");
        say("Connection back: resuming from " + bytes(upload.offset) + ".");
        return sendPieces(session);
      });
    });
  };

  var answered = function (session, response) {
    if (session.stopped) return null;
    if (response.status === 200) {
      return response.json().then(function (upload) {
        session.failures = 0;
        session.offset = upload.offset;
        if (root.dataset.state !== "uploading") { setState("uploading"); say("Uploading…"); }
        showProgress(session);
        return sendPieces(session);
      });
    }
    if (response.status === 201) {
      return response.json().then(function (upload) { return finished(session, upload); });
    }
    if (response.status === 409) {
      // The server holds a different count (a piece was cut short, or sent twice): go on from its offset.
      var offset = parseInt(response.headers.get("Upload-Offset"), 10);
      if (isNaN(offset)) return recover(session, "The server and this page disagree on the upload's position.");
      session.offset = offset;
      showProgress(session);
      return sendPieces(session);
    }
    if (response.status >= 500) {
      var fallback = "The server could not store the piece (HTTP " + response.status + ").";
      return detailOf(response, fallback).then(function (detail) { return recover(session, detail); });
    }
    if (response.status === 401) {
      // Signed out for inactivity or the session's age: the server's reason, then how to go on.
      return detailOf(response, "").then(function (detail) {
        stop(session, "error", detail ? detail + " Then choose the same file: the upload goes on from where it stopped." : SIGNED_OUT);
      });
    }
    if (response.status === 403) return stop(session, "error", SIGNED_OUT);
    if (response.status === 404) {
      forget(session.file);
      return stop(session, "error", GONE);
    }
    // 400 / 413 / 415: the file (or this upload) was refused; the server says why.
    return detailOf(response, "The server refused the upload (HTTP " + response.status + ").").then(function (detail) {
      return askServer(session.id).then(function (upload) {
        if (!upload || upload.status !== "receiving") forget(session.file);
        stop(session, "error", detail);
      });
    });
  };

  var sendPieces = function (session) {
    if (session.stopped) return null;
    if (session.offset >= session.size) {
      // Every byte is on the server but no answer said what became of the file: ask.
      return recover(session, "Waiting for the server to check the file.");
    }
    var end = Math.min(session.size, session.offset + session.piece);
    var controller = new AbortController(), timedOut = false;
    session.controller = controller;
    // A connection that stalls without failing (a network switched under it) is given up on.
    var watchdog = setTimeout(function () { timedOut = true; controller.abort(); }, PIECE_TIMEOUT_MS);
    return api("PATCH", uploadUrl(session.id), {
      headers: {"Upload-Offset": String(session.offset), "Content-Type": "application/offset+octet-stream"},
      body: session.file.slice(session.offset, end),
      signal: controller.signal
    }).then(
      function (response) {
        clearTimeout(watchdog);
        return answered(session, response);
      },
      function (error) {
        clearTimeout(watchdog);
        if (session.stopped) return null;
        if (timedOut) return recover(session, "The server did not answer for " + duration(PIECE_TIMEOUT_MS / 1000) + ".");
        var why = error && error.message ? error.message : "network error";
        return recover(session, "The connection was lost (" + why + ").");
      }
    );
  };

  var begin = function (file, upload) {
    var session = {
      file: file,
      id: upload.id,
      size: file.size,
      offset: upload.offset,
      piece: pieceBytes(upload.piece_max_bytes),
      samples: [],
      failures: 0,
      stopped: false,
      controller: null,
      wake: null
    };
    current = session;
    note.textContent = "";
    setState("uploading");
    say(upload.offset ? "Resuming from " + bytes(upload.offset) + "…" : "Uploading…");
    showProgress(session);
    return sendPieces(session);
  };

  var refused = function (message) {
    setState("error");
    say("");
    busy(false);
    showError(message);
  };

  var start = function () {
    var file = input.files[0];
    if (!file || current) return;
    showError("");
    result.hidden = true;
    busy(true);
    setState("starting");
    say("Starting the upload…");
    unfinished(file).then(function (upload) {
      if (upload) return begin(file, upload);
      return api("POST", root.dataset.startUrl, {
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({name: file.name, size: file.size})
      }).then(
        function (response) {
          if (response.status === 201) {
            return response.json().then(function (created) {
              remember(file, created.id);
              return begin(file, created);
            });
          }
          if (response.status === 403) return refused(SIGNED_OUT);
          var fallback = "The server refused the upload (HTTP " + response.status + ").";
          return detailOf(response, fallback).then(refused);
        },
        function () { refused("The server cannot be reached: nothing was uploaded. Check the connection and try again."); }
      );
    });
  };

  // A file chosen: say whether an unfinished upload of it is on the server (then Upload resumes it).
  var chosen = function () {
    var file = input.files[0];
    showError("");
    note.textContent = "";
    say("");
    progressBox.hidden = true;
    startButton.textContent = "Upload";
    startButton.disabled = !file;
    setState("idle");
    if (!file) return;
    unfinished(file).then(function (upload) {
      if (!upload || input.files[0] !== file || current) return;
      var percent = Math.floor((100 * upload.offset) / upload.size);
      note.textContent = "Resuming: " + percent + "% already on the server (" + bytes(upload.offset) + " of " +
        bytes(upload.size) + "); Resume upload sends the rest.";
      startButton.textContent = "Resume upload";
    });
  };

  var cancel = function () {
    var session = current;
    if (!session) return;
    stop(session, "cancelled", "");
    if (session.controller) session.controller.abort();
    if (session.wake) session.wake();
    forget(session.file);
    progressBox.hidden = true;
    say("Cancelling…");
    api("DELETE", uploadUrl(session.id)).then(
      function (response) {
        say(response.ok ? "Upload cancelled: nothing was kept." : "Upload cancelled here; the server removes the partial file when it expires.");
      },
      function () { say("Upload cancelled here; the server removes the partial file when it expires."); }
    );
  };

  // ---- after the upload: the slide's analysis ---------------------------------------------

  var showResult = function (slide) {
    setState("analysing");
    result.hidden = false;
    var link = document.getElementById("slide-upload-viewer");
    link.href = slide.links.viewer;
    link.textContent = slide.name;
    var label = document.getElementById("slide-upload-analysis");
    var analysisBar = document.getElementById("slide-upload-analysis-bar");
    var tiles = document.getElementById("slide-upload-tiles");
    var show = function (data) {
      var progress = data.progress || {};
      if (data.status === "done") {
        setState("done");
        label.textContent = "Done";
        analysisBar.hidden = true;
        tiles.textContent = (progress.tiles_finished || 0) + " tissue tiles analysed.";
        return true;
      }
      if (data.status === "failed") {
        setState("failed");
        label.textContent = "Failed: " + (data.failure_reason || "the analysis did not finish");
        analysisBar.hidden = true;
        tiles.textContent = "";
        return true;
      }
      label.textContent = "Uploaded: analysing (" + data.status_display + ")";
      analysisBar.max = Math.max(1, progress.tiles_total || 0);
      analysisBar.value = progress.tiles_finished || 0;
      var text = progress.tiles_total ? (progress.tiles_finished || 0) + " of " + progress.tiles_total + " tissue tiles analysed" : "";
      if (progress.eta_seconds !== null && progress.eta_seconds !== undefined) text += " · about " + duration(progress.eta_seconds) + " left";
      tiles.textContent = text;
      return false;
    };
    show(slide);
    // ?refresh=auto: polling is not a person's activity (the idle logoff ignores it).
    var poll = function () {
      api("GET", slideUrl(slide.id) + "?refresh=auto").then(
        function (response) { return response.ok ? response.json() : null; },
        function () { return null; }
      ).then(function (data) {
        if (data && show(data)) return;
        setTimeout(poll, POLL_MS);
      });
    };
    setTimeout(poll, POLL_MS);
  };

  input.addEventListener("change", chosen);
  root.addEventListener("submit", function (event) {
    event.preventDefault();
    start();
  });
  cancelButton.addEventListener("click", cancel);
  setState("idle");
  if (input.files.length) chosen();  // a file the browser kept across a reload
})();
