// Before joining: the pre-join screen (name, camera preview, camera / microphone / speaker, join with the
// microphone or camera off). Also the device choice itself, which the Settings dialog offers during the call,
// and what our own tile says when a device is refused or unplugged. The media is the client's
// (HuddleClient.useDevices): the stream in the preview is the one the call sends, captured once.

import { CAN_CHOOSE_SPEAKER, listDevices, mediaProblemWords, onDeviceChange } from '../lib/devices.js';
import { $ } from './dom.js';
import { nameFormShown, showNameForm } from './panels.js';
import { tiles } from './tiles.js';

const ui = {
  grid: $('#grid'),
  preview: $('#prejoin-preview'),
  note: $('#prejoin-media-note'),
  micOff: $('#join-mic-off'),
  cameraOff: $('#join-camera-off'),
};

let huddle = null; // the HuddleClient (initPrejoin)
const pickers = []; // {camera, microphone, speaker}: <select>s (the pre-join screen's, the Settings dialog's)
let speakerId = ''; // '' : the system's default output

/** The problem with our camera or microphone worth a sentence, or ''. */
function problemWords() {
  const error = huddle.mediaError;
  if (!error) return '';
  const working = error.kind === 'both' ? huddle.hasAudio && huddle.hasVideo
    : error.kind === 'audio' ? huddle.hasAudio : huddle.hasVideo;
  return working ? '' : mediaProblemWords(error);
}

function currentDeviceId(kind) {
  const track = huddle.localStream?.getTracks().find((t) => t.kind === kind && t.readyState === 'live');
  return track ? track.getSettings().deviceId || '' : '';
}

function fill(select, devices, current) {
  const options = devices.map((device) => new Option(device.label, device.deviceId));
  if (!devices.length) options.push(new Option('None found', ''));
  select.replaceChildren(...options);
  select.disabled = !devices.length;
  if (devices.some((device) => device.deviceId === current)) select.value = current;
}

/** Every device <select> lists the devices there are now, with the ones in use chosen. */
export async function refreshDevices() {
  const devices = await listDevices();
  for (const picker of pickers) {
    fill(picker.camera, devices.videoinput, currentDeviceId('video'));
    fill(picker.microphone, devices.audioinput, currentDeviceId('audio'));
    fill(picker.speaker, devices.audiooutput, speakerId || 'default');
    // Without setSinkId (Firefox before 116, Safari) sound goes where the system sends it: nothing to choose.
    picker.speaker.parentElement.hidden = !CAN_CHOOSE_SPEAKER || !devices.audiooutput.length;
  }
}

/** Remote videos play through the chosen speaker. */
function applySpeaker() {
  if (!CAN_CHOOSE_SPEAKER || !speakerId) return;
  for (const video of ui.grid.querySelectorAll('.tile.remote video')) {
    if (video.sinkId !== speakerId) video.setSinkId(speakerId).catch((err) => console.info('speaker:', err.name));
  }
}

/** `selects` ({camera, microphone, speaker}) choose the devices from now on. */
export function addDevicePicker(selects) {
  pickers.push(selects);
  selects.camera.addEventListener('change', () => {
    huddle.useDevices({ videoDeviceId: selects.camera.value }).then(refreshDevices);
  });
  selects.microphone.addEventListener('change', () => {
    huddle.useDevices({ audioDeviceId: selects.microphone.value }).then(refreshDevices);
  });
  selects.speaker.addEventListener('change', () => {
    speakerId = selects.speaker.value;
    applySpeaker();
    for (const picker of pickers) picker.speaker.value = speakerId;
  });
}

function showPreview() {
  if (!nameFormShown()) return;
  const stream = huddle.localStream;
  if (ui.preview.srcObject !== stream) ui.preview.srcObject = stream;
  if (stream) ui.preview.play().catch(() => {});
  const problem = problemWords();
  const words = problem || (huddle.mediaPreferences.video ? '' : 'Your camera is off');
  ui.note.textContent = words;
  ui.note.hidden = !words;
  ui.note.dataset.kind = problem ? 'problem' : 'info';
}

/** Our tile says what is wrong with our camera or microphone (instead of a blank picture). */
function updateOwnNote() {
  const tile = tiles.get('local');
  if (!tile) return;
  let note = $('.media-note', tile);
  const words = problemWords();
  if (!note && !words) return;
  if (!note) {
    note = document.createElement('p');
    note.className = 'media-note';
    note.setAttribute('role', 'status');
    tile.append(note);
  }
  // Only real changes: the grid's MutationObserver calls this, and must not hear its own writes.
  if (note.textContent !== words) note.textContent = words;
  if (note.hidden !== !words) note.hidden = !words;
}

/**
 * The pre-join screen, with `name` filled in (else the one this browser remembers) and `message` if given;
 * camera and microphone are captured for the preview if they are not yet.
 */
export function showPrejoin(name, message) {
  showNameForm(name, message);
  ui.micOff.checked = !huddle.mediaPreferences.audio;
  ui.cameraOff.checked = !huddle.mediaPreferences.video;
  showPreview();
  const capture = huddle.hasAudio || huddle.hasVideo ? Promise.resolve() : huddle.useDevices({});
  capture.then(refreshDevices);
}

export function initPrejoin(client) {
  huddle = client;
  addDevicePicker({
    camera: $('#prejoin-camera'), microphone: $('#prejoin-microphone'), speaker: $('#prejoin-speaker'),
  });
  ui.micOff.addEventListener('change', () => huddle.setAudioEnabled(!ui.micOff.checked));
  ui.cameraOff.addEventListener('change', () => {
    huddle.setVideoEnabled(!ui.cameraOff.checked);
    showPreview();
  });

  const update = () => {
    showPreview();
    updateOwnNote();
  };
  huddle.addEventListener('local-stream', update);
  huddle.addEventListener('local-media', update);
  huddle.addEventListener('state', () => {
    // Joining: the call shows the stream now, the hidden preview lets go of it.
    if (!nameFormShown()) ui.preview.srcObject = null;
    updateOwnNote();
  });
  // Tiles come and go: new remote videos play through the chosen speaker too; ours may need its note.
  new MutationObserver(() => {
    applySpeaker();
    updateOwnNote();
  }).observe(ui.grid, { childList: true, subtree: true });

  onDeviceChange(() => {
    // An unplugged device: take whatever works now (the default), then list what there is.
    const lost = huddle.mediaError?.name === 'ended' ? huddle.useDevices({}) : Promise.resolve();
    lost.then(refreshDevices);
  });
}
