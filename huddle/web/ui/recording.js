// Recording (docs/protocol.md, "Recording"): the record button (for those allowed to record), the indicator
// everyone sees while a recording runs, and the announcement for screen readers.

import { $ } from './dom.js';
import { sentence, showError } from './status.js';

// Why a start_recording / stop_recording was refused (other codes: the server's own words).
const RECORDING_ERROR_WORDS = {
  forbidden: 'Your invite link does not allow recording this call.',
  already_recording: 'This call is being recorded already.',
  unavailable: 'This server cannot record calls right now.',
  unknown_type: 'This server cannot record calls.', // one older than this page
};

const ui = {
  recordButton: $('#toggle-recording'),
  recordingIndicator: $('#recording-indicator'),
  recordingElapsed: $('#recording-indicator .recording-elapsed'),
  recordingAnnouncer: $('#recording-announcer'),
  recordingsLink: $('#recordings-link'),
};

let huddle = null; // the HuddleClient (initRecording)
let recordingPending = false; // a start or stop is on its way: the button waits for the answer
let recordingSince = 0; // when the running recording started, in this machine's Date.now() terms
let recordingTimer = null;

/** Who started the recording, in words, or null when we cannot say. */
function recordingStarter(startedBy) {
  if (startedBy === 'api') return 'an integration';
  if (startedBy && startedBy === huddle.self?.id) return 'you';
  return huddle.participants.get(startedBy)?.name || null;
}

function elapsedWords(ms) {
  const seconds = Math.max(0, Math.floor(ms / 1000));
  const hours = Math.floor(seconds / 3600);
  const minutes = Math.floor(seconds / 60) % 60;
  const mmss = `${String(minutes).padStart(hours ? 2 : 1, '0')}:${String(seconds % 60).padStart(2, '0')}`;
  return hours ? `${hours}:${mmss}` : mmss;
}

function updateElapsed() {
  ui.recordingElapsed.textContent = recordingSince ? elapsedWords(Date.now() - recordingSince) : '';
}

/** The indicator (everyone, while a recording runs) and the record button (those allowed to record). */
export function updateRecording() {
  const recording = huddle.recording;
  const inCall = huddle.state === 'connected' || huddle.state === 'reconnecting';
  const shown = Boolean(recording) && inCall;
  ui.recordingIndicator.hidden = !shown;
  if (shown) {
    const who = recordingStarter(recording.started_by);
    ui.recordingIndicator.title = who ? `Recording started by ${who}` : 'This call is being recorded';
    updateElapsed();
    if (!recordingTimer) recordingTimer = setInterval(updateElapsed, 1000);
  } else {
    clearInterval(recordingTimer);
    recordingTimer = null;
  }

  ui.recordButton.hidden = !(inCall && huddle.permissions?.record === true);
  ui.recordButton.disabled = huddle.state !== 'connected';
  // aria-disabled, not disabled, while waiting: a disabled button would drop the keyboard focus.
  ui.recordButton.setAttribute('aria-disabled', String(recordingPending));
  ui.recordButton.setAttribute('data-active', String(Boolean(recording)));
  ui.recordButton.title = recording ? 'Stop recording' : 'Start recording';
}

function recordingErrorWords({ code, message, request }) {
  if (RECORDING_ERROR_WORDS[code]) return RECORDING_ERROR_WORDS[code];
  const what = request === 'stop_recording' ? 'stop' : 'start';
  if (code === 'connection_lost') {
    // The request may have reached the server before the socket went: only the indicator knows.
    return `The connection to the server was interrupted while asking it to ${what} the recording. `
      + 'Once reconnected, the header shows whether the call is being recorded.';
  }
  return `Could not ${what} the recording. ${sentence(message)}`;
}

/** Whether an `error` event's detail answers the record button (this module says so, nobody else). */
export function isRecordingError(detail) {
  return detail.request === 'start_recording' || detail.request === 'stop_recording';
}

function onRecording(event) {
  const { recording, previous, reason } = event.detail;
  if (recording) {
    // Seen as it started: our own clock's now. Found running on joining: the server's clock, which may be
    // somewhat off ours (the elapsed time never shows below zero).
    recordingSince = reason === 'started' || !(recording.started_at > 0) ? Date.now() : recording.started_at * 1000;
  } else {
    recordingSince = 0;
  }
  if (reason === 'left') ui.recordingAnnouncer.textContent = '';
  else if (recording) ui.recordingAnnouncer.textContent = 'This call is being recorded';
  else if (previous) ui.recordingAnnouncer.textContent = 'Recording stopped';
  updateRecording();
}

function onError(event) {
  const detail = event.detail;
  if (!isRecordingError(detail)) return;
  // Answers to the record button: a passing note, as the indicator shows what is true either way.
  // not_recording: someone else stopped it first, which is what was asked for.
  if (detail.code !== 'not_recording') showError(recordingErrorWords(detail), { sticky: false });
}

async function onRecordClick() {
  if (recordingPending) return;
  recordingPending = true;
  updateRecording();
  try {
    if (huddle.recording) await huddle.stopRecording();
    else await huddle.startRecording();
  } catch {
    // Reported through the `error` event (detail.request).
  } finally {
    recordingPending = false;
    updateRecording();
  }
}

/**
 * Shows the recording state of `client` (a HuddleClient) from now on. `room`, `token`: what the page was
 * opened with, for the link to the room's recordings.
 */
export function initRecording(client, { room, token }) {
  huddle = client;
  const query = token ? `?token=${encodeURIComponent(token)}` : '';
  ui.recordingsLink.href = `/r/${encodeURIComponent(room)}/recordings${query}`;
  huddle.addEventListener('recording', onRecording);
  huddle.addEventListener('error', onError);
  ui.recordButton.addEventListener('click', onRecordClick);
}

/** For a room name that cannot be joined: no link to its recordings. */
export function hideRecordingsLink() {
  ui.recordingsLink.hidden = true;
}
