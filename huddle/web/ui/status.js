// The header's status (the connection, a passing notice, the number of people) and the error banner, with
// the words for each error code.

import { $ } from './dom.js';

const STATUS_WORDS = {
  idle: 'Not connected',
  connecting: 'Connecting…',
  connected: 'Connected',
  reconnecting: 'Reconnecting…',
  disconnected: 'Connection lost',
  error: 'Not connected',
};

export const ERROR_WORDS = {
  unauthorized: 'This invite link is not valid. Ask whoever invited you for a new link.',
  token_expired: 'This invite link has expired. Ask whoever invited you for a new link.',
  wrong_room: 'This invite link is for a different room. Open the link you were sent for this call.',
  invalid_room: 'This room name is not allowed. Room names are 1–64 letters, digits, “-” or “_”.',
  invalid_name: 'Please enter a name of 1–64 characters.',
  room_full: 'This call is full. Try again later.',
  already_joined: 'You are already in this call.',
  connection_failed: 'Could not reach the Huddle server. Check your connection and try again.',
  connection_lost: 'The connection to the server was lost.',
  replaced: 'You joined this call from another tab or device, so this one was disconnected.',
  unsupported_mode: 'This call uses a mode this page does not support yet. Try reloading the page.',
  resume_failed: 'The connection to the call was lost for too long to pick it up again. Rejoin to continue.',
  removed: 'The server ended your connection to the call. Rejoin to continue.',
  bad_sdp: 'The server could not use this browser’s audio or video. Try reloading the page.',
  relay_unavailable: '“Always relay calls” is on, but this server has no relay, so the call cannot connect. '
    + 'Turn it off in Settings and rejoin to connect directly.',
};

// Errors that need no words for people: retried, or only interesting to developers.
// unknown_type: a server older than this page (e.g. one that does not know `video_sizes`) works without it.
export const QUIET_ERRORS = new Set(['rate_limited', 'unknown_participant', 'aborted', 'wrong_mode', 'timeout',
  'unknown_type']);

// Said for a moment in the status pill after a resume that found the call gone from the server's memory
// (`resumed` with `restored`): the server restarted, or another one took the call over (`moved`).
export const RESTORED_WORDS = 'The server restarted; you are back in the call';
export const MOVED_WORDS = 'The call moved to another server; you are back in it';
const STATUS_NOTICE_MS = 6000;

const ui = {
  status: $('#status'),
  count: $('#participant-count'),
  error: $('#error'),
  errorText: $('#error .error-text'),
  leaveButton: $('#leave'),
  networkBanner: $('#network-banner'),
};

let huddle = null; // the HuddleClient (initStatus)
let statusNoticeTimer = null;
let errorTimer = null;

export function setStatus(state) {
  clearTimeout(statusNoticeTimer);
  statusNoticeTimer = null;
  ui.status.removeAttribute('title');
  ui.status.dataset.state = state;
  ui.status.textContent = STATUS_WORDS[state] || state;
  document.body.dataset.state = state;
  const inCall = state === 'connecting' || state === 'connected' || state === 'reconnecting';
  ui.leaveButton.disabled = !inCall;
  updateCount();
}

/**
 * What just happened, said in place of the status for a few seconds (it fades, then the status is back):
 * in the header, so it covers neither the stage nor the controls, and read out like any status change.
 */
export function showStatusNotice(text) {
  setStatus(huddle.state);
  const notice = document.createElement('span');
  notice.className = 'status-notice';
  notice.textContent = text;
  notice.style.animationDuration = `${STATUS_NOTICE_MS}ms`;
  ui.status.replaceChildren(notice);
  ui.status.title = text; // the whole of it where the header is too narrow to show it
  statusNoticeTimer = setTimeout(() => setStatus(huddle.state), STATUS_NOTICE_MS);
}

export function updateCount() {
  const inCall = huddle.state === 'connected' || huddle.state === 'reconnecting';
  ui.count.hidden = !inCall;
  if (inCall) {
    const people = huddle.participants.size + 1;
    ui.count.textContent = people === 1 ? 'Only you' : `${people} people`;
  }
}

export function showError(text, { sticky = true } = {}) {
  clearTimeout(errorTimer);
  ui.errorText.textContent = text;
  ui.error.hidden = false;
  if (!sticky) errorTimer = setTimeout(hideError, 8000);
}

export function hideError() {
  clearTimeout(errorTimer);
  ui.error.hidden = true;
  ui.errorText.textContent = '';
}

/** `text` as a sentence: a capital first, a full stop last. */
export function sentence(text) {
  const trimmed = String(text || '').trim();
  if (!trimmed) return 'Something went wrong.';
  const capital = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

/** Words for an `error` event's detail; `token`: the invite token the page was opened with, if any. */
export function errorWords({ code, message, mediaError }, token) {
  if (code === 'media_unavailable') {
    if (mediaError === 'NotAllowedError' || mediaError === 'SecurityError') {
      return 'Camera and microphone access is blocked, so others can neither see nor hear you. '
        + 'Allow access in your browser and rejoin.';
    }
    if (mediaError === 'NotFoundError' && !huddle.localStream) {
      return 'No camera or microphone was found, so others can neither see nor hear you.';
    }
    return sentence(message);
  }
  if (code === 'unauthorized' && !token) {
    return 'This call needs an invite link. Ask whoever invited you for one.';
  }
  if (code === 'peer_error') return 'Could not connect to one of the participants.';
  return ERROR_WORDS[code] || sentence(message);
}

/** Shows the state of `client` (a HuddleClient) from now on. */
export function initStatus(client) {
  huddle = client;
  ui.error.querySelector('.dismiss').addEventListener('click', hideError);
}

// --- the network banner ---

let network = null; // the ConnectionMonitor (watchNetwork)

/**
 * The banner in the header while our connection is lost: media silent on every connection that carried some
 * (seen within 2-3 s, lib/stats.js), or the signaling socket being resumed. It sits in the header's flow, so
 * it never covers tiles, names or buttons, and goes as soon as media flows again.
 */
function updateNetworkBanner() {
  const inCall = huddle.state === 'connected' || huddle.state === 'reconnecting';
  const lost = inCall && (huddle.state === 'reconnecting' || Boolean(network?.lost));
  if (ui.networkBanner.hidden !== lost) return;
  ui.networkBanner.hidden = !lost;
  document.body.classList.toggle('network-lost', lost);
}

/** The network banner for `monitor` (a ConnectionMonitor of the client initStatus was given). */
export function watchNetwork(monitor) {
  network = monitor;
  monitor.addEventListener('update', updateNetworkBanner);
  huddle.addEventListener('state', updateNetworkBanner);
  updateNetworkBanner();
}
