// The call page: turns HuddleClient events into tiles, buttons and messages. All signaling and WebRTC work is
// in client.js; the parts of the page are in ui/ (tiles, stage, status, recording, settings, controls,
// panels); this file wires them to the client.

import { HuddleClient, ROOM_PATTERN } from './client.js';
import { $ } from './ui/dom.js';
import { hideCopyLink, initControls, updateLocalState } from './ui/controls.js';
import { initPanels, nameFormShown, showCall, showJoinFailed, showLeftPanel } from './ui/panels.js';
import { initPrejoin, showPrejoin } from './ui/prejoin.js';
import { hideRecordingsLink, initRecording, isRecordingError, updateRecording } from './ui/recording.js';
import { initChat } from './ui/chat.js';
import { initPeople } from './ui/people.js';
import { ConnectionMonitor } from './lib/stats.js';
import { initSettings, storedRelayChoice } from './ui/settings.js';
import { initScreenShare } from './ui/screen.js';
import { initShortcuts } from './ui/shortcuts.js';
import { initStage, layout, noteSpeaker, reportVideoSizes } from './ui/stage.js';
import {
  ERROR_WORDS, MOVED_WORDS, QUIET_ERRORS, RESTORED_WORDS, errorWords, hideError, initStatus, setStatus,
  showError, showStatusNotice, updateCount, watchNetwork,
} from './ui/status.js';
import {
  clearRemoteTiles, ensureRemoteTile, localTile as ownTile, playVideo, removeRemoteTile, setTileConnection,
  setTileName, soundAllowed, tiles,
} from './ui/tiles.js';

// --- what this page was opened with ---

function roomFromPath() {
  const match = location.pathname.match(/^\/r\/([^/]+)\/?$/);
  if (!match) return '';
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return match[1];
  }
}

const params = new URLSearchParams(location.search);
const room = roomFromPath();
const token = params.get('token') || undefined;
let displayName = params.get('name') || undefined;

const huddle = new HuddleClient({ relayOnly: storedRelayChoice() });
window.huddle = huddle;

function localTile() {
  return ownTile(displayName);
}

function showLeft(title, note, action) {
  showLeftPanel(title, note, action, ROOM_PATTERN.test(room));
}

async function joinCall() {
  hideError();
  showCall();
  localTile();
  if (displayName) setTileName(tiles.get('local'), displayName, true);
  try {
    await huddle.join({ room, name: displayName, token });
  } catch {
    // Reported through the `error` event.
  }
}

initStatus(huddle);
initStage(huddle);
initRecording(huddle, { room, token });
initPrejoin(huddle);
initSettings(huddle);
initShortcuts();
initControls(huddle, { localTile, room });
// Chat, people, hands, connection quality and the network banner (one getStats sweep a second for the last two).
const connectionMonitor = new ConnectionMonitor(huddle);
initChat(huddle);
initPeople(huddle, connectionMonitor);
watchNetwork(connectionMonitor);
initScreenShare(huddle);
initPanels({
  onRejoin: () => {
    if (displayName || token) joinCall();
    else showPrejoin(displayName);
  },
  onName: (name) => {
    displayName = name;
    joinCall();
  },
});

// --- client events ---

// The last error, so that the panel after a lost connection can say why.
let lastErrorCode = null;

huddle.addEventListener('state', (event) => {
  const { state } = event.detail;
  setStatus(state);
  updateRecording();
  // While reconnecting, tiles and media stay as they are: the status says "Reconnecting…".
  if (state === 'disconnected') {
    clearRemoteTiles();
    const note = lastErrorCode === 'resume_failed'
      ? 'The connection to the call was lost and could not be restored in time.'
      : 'The connection to the call was lost.';
    showLeft('You are disconnected', note, 'Rejoin');
  } else if (state === 'error' && !nameFormShown()) {
    clearRemoteTiles();
    showJoinFailed(lastErrorCode, errorWords({ code: lastErrorCode }, token), ROOM_PATTERN.test(room));
  }
});

huddle.addEventListener('joined', (event) => {
  const { self, participants } = event.detail;
  displayName = self.name;
  setTileName(localTile(), self.name, true);
  for (const participant of participants) ensureRemoteTile(participant);
  updateLocalState();
  updateCount();
  updateRecording(); // permissions.record
  // Measured now (not after the observers' turn), so that the SFU's first `video_sizes` names everyone.
  reportVideoSizes();
});

huddle.addEventListener('resumed', (event) => {
  const { restored, moved } = event.detail;
  if (restored) showStatusNotice(moved ? MOVED_WORDS : RESTORED_WORDS);
});

huddle.addEventListener('mode', () => {
  layout();
  reportVideoSizes(); // the SFU transport just started: it sends these at once
});

huddle.addEventListener('active-speaker', (event) => noteSpeaker(event.detail.id));

huddle.addEventListener('participant-joined', (event) => {
  ensureRemoteTile(event.detail.participant);
  updateCount();
});

huddle.addEventListener('participant-left', (event) => {
  removeRemoteTile(event.detail.participantId);
  updateCount();
});

huddle.addEventListener('participant-updated', (event) => {
  const { participant, isSelf } = event.detail;
  if (isSelf) {
    updateLocalState();
    return;
  }
  if (tiles.has(participant.id)) ensureRemoteTile(participant);
});

huddle.addEventListener('track', (event) => {
  const { participantId, stream } = event.detail;
  const participant = huddle.participants.get(participantId);
  if (!participant) return;
  const video = $('video', ensureRemoteTile(participant));
  // Setting srcObject again (even to the same stream) makes the element pick up the track just added.
  video.srcObject = stream;
  if (soundAllowed()) video.muted = false;
  playVideo(video);
});

huddle.addEventListener('track-removed', (event) => {
  const tile = tiles.get(event.detail.participantId);
  if (!tile) return;
  const video = $('video', tile);
  // Reassigning srcObject makes the element drop the track that left the stream.
  video.srcObject = event.detail.stream;
  playVideo(video);
});

huddle.addEventListener('peer-state', (event) => {
  const { participantId, connectionState } = event.detail;
  const tile = tiles.get(participantId);
  if (tile) setTileConnection(tile, connectionState);
});

huddle.addEventListener('error', (event) => {
  const detail = event.detail;
  if (isRecordingError(detail)) return; // ui/recording.js answers these
  if (detail.request === 'chat') return; // ui/chat.js answers these, in its panel
  lastErrorCode = detail.code;
  if (QUIET_ERRORS.has(detail.code)) {
    console.info('huddle:', detail.code, detail.message);
    return;
  }
  if (detail.code === 'invalid_name' && !token) {
    clearRemoteTiles();
    showPrejoin(displayName, ERROR_WORDS.invalid_name);
    return;
  }
  const transient = detail.code === 'peer_error';
  showError(errorWords(detail, token), { sticky: !transient });
});

$('#leave').addEventListener('click', () => {
  huddle.leave();
  clearRemoteTiles();
  hideError();
  showLeft('You left the call', 'Rejoin whenever you are ready.', 'Rejoin');
});

// Tell the others at once when this tab goes away: a socket that closes without `leave` keeps our seat for the
// reconnection grace period (20 s), a closed tab must not.
window.addEventListener('pagehide', () => {
  if (['connected', 'connecting', 'reconnecting'].includes(huddle.state)) huddle.leave();
});

// --- start ---

$('#room-name').textContent = room;
$('.panel-room', $('#join-panel')).textContent = room;
document.title = room ? `${room} · Huddle` : 'Huddle';
setStatus(huddle.state);
updateRecording();
updateLocalState();

if (!ROOM_PATTERN.test(room)) {
  // The client refuses it too (state `error`, error `invalid_room`); nothing is captured or sent.
  hideCopyLink();
  hideRecordingsLink();
  huddle.join({ room, name: displayName, token }).catch(() => {});
} else if (displayName || token) {
  joinCall();
} else {
  showPrejoin(displayName);
}
