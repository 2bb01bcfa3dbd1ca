// The recordings page (/r/{room}/recordings): the room's recordings, newest first, with a download link per
// file. Reads GET /api/rooms/{room}/recordings (docs/protocol.md, "Recording"); while one is still being
// made or finished, it asks again every few seconds.

import { ROOM_PATTERN } from './client.js';

const REFRESH_MS = 3000; // while some recording is not stored yet
const RETRY_MS = 10000; // after a failed request
const COMPOSITE_FILE = 'speaker-view.mp4';
const MANIFEST_FILE = 'manifest.json';

const STATE_WORDS = {
  recording: 'Recording now',
  processing: 'Being finished',
  uploading: 'Being stored',
  stored: 'Ready',
  failed: 'Failed',
};

// Said under a recording whose files are not all there (yet).
const FILES_NOTES = {
  recording: 'Its files can be downloaded here once the recording has stopped.',
  processing: 'Its files are being finished and stored; they appear here as they are ready.',
  uploading: 'Its files are finished and on their way to the store; they appear here as they arrive.',
  failed: 'Its files could not be finished.',
};

const $ = (selector, root = document) => root.querySelector(selector);

const ui = {
  status: $('#recordings-status'),
  list: $('#recordings-list'),
  template: $('#recording-template'),
};

function roomFromPath() {
  const match = location.pathname.match(/^\/r\/([^/]+)\/recordings\/?$/);
  if (!match) return '';
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return match[1];
  }
}

const room = roomFromPath();
const token = new URLSearchParams(location.search).get('token') || undefined;
// Whether this page's link may download files (the list says; with a token, only its `download` permission).
let canDownload = true;

const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });

/** A path on this server, with the page's token when it has one (downloads need it as the list does). */
function withToken(path) {
  const url = new URL(path, location.origin);
  if (token) url.searchParams.set('token', token);
  return url.pathname + url.search;
}

/**
 * When a recording started, as a Date: `started_at` when the server still knows it, else from the id, which
 * begins with the start time in UTC ("20261125T120301Z-ab12cd"). Null when neither says.
 */
function startOf(recording) {
  if (recording.started_at > 0) return new Date(recording.started_at * 1000);
  const match = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z/.exec(recording.id);
  if (!match) return null;
  const [year, month, day, hours, minutes, seconds] = match.slice(1).map(Number);
  return new Date(Date.UTC(year, month - 1, day, hours, minutes, seconds));
}

function durationWords(seconds) {
  const total = Math.max(0, Math.round(seconds));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor(total / 60) % 60;
  const mmss = `${String(minutes).padStart(hours ? 2 : 1, '0')}:${String(total % 60).padStart(2, '0')}`;
  return hours ? `${hours}:${mmss}` : mmss;
}

const SIZE_UNITS = ['kilobyte', 'megabyte', 'gigabyte', 'terabyte'];

function sizeWords(bytes) {
  if (!(bytes >= 0)) return '';
  if (bytes < 1000) return `${bytes} ${bytes === 1 ? 'byte' : 'bytes'}`;
  let value = bytes / 1000;
  let unit = 0;
  while (value >= 1000 && unit < SIZE_UNITS.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return new Intl.NumberFormat(undefined, {
    style: 'unit', unit: SIZE_UNITS[unit], unitDisplay: 'short', maximumFractionDigits: value < 10 ? 1 : 0,
  }).format(value);
}

/** What a file holds, in words: the names the server gives them (docs/protocol.md, "Recording"). */
function fileWords(name) {
  if (name === COMPOSITE_FILE) return 'Speaker view: the whole call in one video';
  if (name === MANIFEST_FILE) return 'How the track files line up in time';
  const kind = /-(audio|video)-\d+\.webm$/.exec(name);
  if (kind) return kind[1] === 'audio' ? 'One person’s audio' : 'One person’s video';
  return '';
}

/** The speaker view first (the file most people want), then the tracks, the manifest last. */
function fileOrder(file) {
  if (file.name === COMPOSITE_FILE) return 0;
  return file.name === MANIFEST_FILE ? 2 : 1;
}

function renderFiles(element, files) {
  const sorted = [...files].sort((a, b) => fileOrder(a) - fileOrder(b) || a.name.localeCompare(b.name));
  element.replaceChildren(...sorted.map((file) => {
    const item = document.createElement('li');
    if (canDownload) {
      const link = document.createElement('a');
      link.className = 'download';
      link.href = withToken(file.url);
      link.download = file.name;
      link.textContent = file.name;
      item.append(link);
    } else {
      const name = document.createElement('span');
      name.textContent = file.name;
      item.append(name);
    }
    const words = [fileWords(file.name), sizeWords(file.size)].filter(Boolean).join(' · ');
    if (words) {
      const note = document.createElement('span');
      note.className = 'file-note';
      note.textContent = words;
      item.append(note);
    }
    return item;
  }));
}

function setText(element, text) {
  // Only on change: screen readers and text selection are left alone by the refreshes.
  if (element.textContent !== text) element.textContent = text;
}

// --- the list ---

const items = new Map(); // recording id -> {element, files: JSON of its files as last shown, startedAt, stoppedAt}

/** One recording's entry, updated in place, so that a refresh moves neither the focus nor the page. */
function renderRecording(recording) {
  let item = items.get(recording.id);
  if (!item) {
    const element = ui.template.content.firstElementChild.cloneNode(true);
    element.dataset.id = recording.id;
    item = { element, files: null, startedAt: 0, stoppedAt: 0 };
    items.set(recording.id, item);
  }
  const { element } = item;
  const state = STATE_WORDS[recording.state] ? recording.state : 'stored';
  element.dataset.state = state;
  // The server knows a recording's times only until it is stored: those seen by an earlier load still hold.
  if (recording.started_at > 0) item.startedAt = recording.started_at;
  if (recording.stopped_at > 0) item.stoppedAt = recording.stopped_at;
  const { startedAt, stoppedAt } = item;

  const started = startOf({ id: recording.id, started_at: startedAt });
  const time = $('time', element);
  setText(time, started ? dateFormat.format(started) : recording.id);
  if (started) time.dateTime = started.toISOString();
  setText($('.recording-state', element), STATE_WORDS[state]);

  let meta = '';
  if (startedAt > 0 && stoppedAt > 0) {
    meta = `Duration ${durationWords(stoppedAt - startedAt)}`;
  } else if (state === 'recording' && startedAt > 0) {
    meta = `Running for ${durationWords(Date.now() / 1000 - startedAt)}`;
  }
  const metaElement = $('.recording-meta', element);
  setText(metaElement, meta);
  metaElement.hidden = !meta;

  const files = Array.isArray(recording.files) ? recording.files : [];
  const signature = JSON.stringify([canDownload, files]);
  if (signature !== item.files) {
    renderFiles($('.files', element), files);
    item.files = signature;
  }
  $('.files', element).hidden = files.length === 0;
  const note = $('.files-note', element);
  const noteWords = FILES_NOTES[state] || (files.length === 0 ? 'No files.' : '');
  setText(note, noteWords);
  note.hidden = !noteWords;
  return element;
}

function render(recordings) {
  const shown = new Set();
  let previous = null;
  for (const recording of recordings) {
    if (!recording || typeof recording.id !== 'string') continue;
    const element = renderRecording(recording);
    shown.add(recording.id);
    // Insert or move only what is out of place: moving an element would take the focus out of it.
    const wanted = previous ? previous.nextElementSibling : ui.list.firstElementChild;
    if (wanted !== element) ui.list.insertBefore(element, wanted);
    previous = element;
  }
  for (const [id, item] of items) {
    if (shown.has(id)) continue;
    item.element.remove();
    items.delete(id);
  }
}

// --- loading ---

let refreshTimer = null;
let pendingBefore = new Set(); // ids not stored yet at the last load

function scheduleLoad(ms) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(load, ms);
}

async function load() {
  let response;
  try {
    response = await fetch(withToken(`/api/rooms/${encodeURIComponent(room)}/recordings`), {
      cache: 'no-store', headers: { Accept: 'application/json' },
    });
  } catch {
    setText(ui.status, 'Could not reach the Huddle server. Trying again…');
    scheduleLoad(RETRY_MS);
    return;
  }
  if (response.status === 401 || response.status === 403) {
    // Asking again would not help: the link itself is wrong (or expired).
    render([]);
    setText(ui.status, 'This link does not give access to the room’s recordings.');
    return;
  }
  let body = null;
  if (response.ok) {
    try {
      body = await response.json();
    } catch {
      body = null;
    }
  }
  if (!body || !Array.isArray(body.recordings)) {
    setText(ui.status, `Could not load the recordings (HTTP ${response.status}). Trying again…`);
    scheduleLoad(RETRY_MS);
    return;
  }

  canDownload = body.download !== false;
  // Newest first, as the server sends them; sorted here too, so that the page does not depend on it.
  const recordings = [...body.recordings].sort((a, b) => String(b.id).localeCompare(String(a.id)));
  render(recordings);
  const pending = new Set(recordings.filter((r) => ['recording', 'processing', 'uploading'].includes(r.state))
    .map((r) => r.id));
  const ready = recordings.filter((r) => pendingBefore.has(r.id) && r.state === 'stored');
  pendingBefore = pending;

  let status = '';
  if (recordings.length === 0) status = 'There are no recordings of this room yet.';
  else if (ready.length === 1) status = 'A recording is ready to download.';
  else if (ready.length > 1) status = `${ready.length} recordings are ready to download.`;
  else if (pending.size > 0) status = 'This list updates itself while a recording is being made or finished.';
  if (!canDownload && recordings.length > 0) {
    status = `${status} This link does not allow downloading them: ask for one that does.`.trim();
  }
  setText(ui.status, status);
  if (pending.size > 0) scheduleLoad(REFRESH_MS);
}

// --- start ---

$('#room-name').textContent = room;
document.title = room ? `Recordings of ${room} · Huddle` : 'Recordings · Huddle';

if (ROOM_PATTERN.test(room)) {
  load();
} else {
  setText(ui.status, 'This room name is not allowed. Room names are 1–64 letters, digits, “-” or “_”.');
}
