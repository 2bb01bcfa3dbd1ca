// Local media: the one place that asks the browser for camera and microphone, lists the devices and says
// what went wrong with them.

export const MEDIA_CONSTRAINTS = Object.freeze({ audio: true, video: { width: 1280, height: 720 } });

const MEDIA_ERROR_WORDS = {
  NotAllowedError: 'access to the camera and microphone was blocked',
  SecurityError: 'access to the camera and microphone was blocked',
  NotFoundError: 'no camera or microphone was found',
  NotReadableError: 'the camera or microphone is in use by another application',
  OverconstrainedError: 'the camera cannot provide the requested video',
  AbortError: 'the camera or microphone could not be started',
  TypeError: 'this browser cannot capture media here (a secure https page is needed)',
};

// Short sentences for our own tile and the pre-join preview, by error name and the device concerned.
const PROBLEM_WORDS = {
  NotAllowedError: (device) => `${device} blocked: allow it in the address bar, then reload`,
  SecurityError: (device) => `${device} blocked: allow it in the address bar, then reload`,
  NotFoundError: (device) => `No ${device.toLowerCase()} found: plug one in`,
  NotReadableError: (device) => `${device} in use by another application: close it, or choose another`,
  OverconstrainedError: (device) => `${device} not available: choose another`,
  AbortError: (device) => `${device} could not be started: choose another`,
  TypeError: () => 'This browser cannot use a camera here: open the call over https',
  ended: (device) => `${device} disconnected: plug it back in, or choose another in Settings`,
};

const DEVICE_NAMES = { audio: 'Microphone', video: 'Camera', both: 'Camera and microphone' };

/**
 * `constraints` (getUserMedia's) asking for the devices named (empty or undefined: any): exactly those, or with
 * `ideal`, those if they are there and else others.
 */
export function withDevices(constraints, { audioDeviceId, videoDeviceId } = {}, { ideal = false } = {}) {
  const out = { ...constraints };
  for (const [kind, deviceId] of [['audio', audioDeviceId], ['video', videoDeviceId]]) {
    if (!deviceId || !out[kind]) continue;
    const wanted = ideal ? { ideal: deviceId } : { exact: deviceId };
    out[kind] = { ...(out[kind] === true ? {} : out[kind]), deviceId: wanted };
  }
  return out;
}

/**
 * Asks for camera and microphone; when that fails, for the microphone alone, then the camera alone. Resolves
 * with {stream, error}: stream is null when nothing could be captured; error describes what is missing:
 * {name, words, kind: 'audio' | 'video' | 'both', partial}.
 */
export async function captureLocalMedia(constraints) {
  const askedFor = constraints.audio && constraints.video ? 'both' : constraints.audio ? 'audio' : 'video';
  if (!navigator.mediaDevices?.getUserMedia) {
    return { stream: null, error: { name: 'TypeError', words: MEDIA_ERROR_WORDS.TypeError, kind: askedFor } };
  }
  let firstError;
  try {
    return { stream: await navigator.mediaDevices.getUserMedia(constraints), error: null };
  } catch (err) {
    firstError = err;
  }
  const fatal = ['NotAllowedError', 'SecurityError', 'TypeError'].includes(firstError.name);
  if (!fatal && constraints.audio && constraints.video) {
    for (const partial of [{ audio: constraints.audio }, { video: constraints.video }]) {
      try {
        const stream = await navigator.mediaDevices.getUserMedia(partial);
        const missing = partial.audio ? 'camera' : 'microphone';
        const kind = partial.audio ? 'video' : 'audio';
        return {
          stream,
          error: { name: firstError.name, words: `the ${missing} is not available`, kind, partial: true },
        };
      } catch {
        // try the next one
      }
    }
  }
  const words = MEDIA_ERROR_WORDS[firstError.name]
    || `the camera and microphone could not be used (${firstError.message})`;
  return { stream: null, error: { name: firstError.name, words, kind: askedFor } };
}

/** What a `mediaError` (captureLocalMedia's, or {name: 'ended', kind}) means to the person, in a sentence. */
export function mediaProblemWords(error) {
  if (!error) return '';
  const device = DEVICE_NAMES[error.kind] || DEVICE_NAMES.both;
  const words = PROBLEM_WORDS[error.name];
  return words ? words(device) : `${device} could not be used`;
}

/**
 * The devices this browser offers: {audioinput, videoinput, audiooutput}, each [{deviceId, label}]. Labels are
 * empty until the page was allowed to capture: then they are numbered ("Camera 1").
 */
export async function listDevices() {
  const out = { audioinput: [], videoinput: [], audiooutput: [] };
  if (!navigator.mediaDevices?.enumerateDevices) return out;
  const names = { audioinput: 'Microphone', videoinput: 'Camera', audiooutput: 'Speaker' };
  for (const device of await navigator.mediaDevices.enumerateDevices()) {
    const list = out[device.kind];
    // Before permission every device of a kind has an empty id: nothing to choose between yet.
    if (!list || !device.deviceId) continue;
    list.push({ deviceId: device.deviceId, label: device.label || `${names[device.kind]} ${list.length + 1}` });
  }
  return out;
}

/** `listener()` whenever a device is plugged in or out. */
export function onDeviceChange(listener) {
  navigator.mediaDevices?.addEventListener?.('devicechange', listener);
}

/** Whether this browser can send a video element's sound to a chosen speaker (HTMLMediaElement.setSinkId). */
export const CAN_CHOOSE_SPEAKER = typeof HTMLMediaElement !== 'undefined'
  && typeof HTMLMediaElement.prototype.setSinkId === 'function';
