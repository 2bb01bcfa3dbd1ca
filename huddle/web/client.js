// Huddle browser SDK: signaling, local media and peer connections. No DOM or UI code lives here.
//
// One concern per module, under lib/:
//   signaling.js  SignalingChannel: one WebSocket, JSON frames, request ids, ping every 5 s, 12 s of silence = lost.
//   p2p.js        MeshTransport, "p2p" mode: one RTCPeerConnection (PeerLink) per remote participant.
//   sfu.js        SfuTransport, "sfu" mode: two RTCPeerConnections with the server (publish: ours; subscribe:
//                 everyone else's).
//   reconnect.js  Reconnector: resumes the call on a new socket when the signaling socket drops; redirects.
//   migration.js  Migration: a call moving p2p -> sfu keeps each P2P connection until the SFU's media flows.
//   devices.js    the camera and microphone.
//   stats.js      what is read from getStats().
//   HuddleClient (here) is the public API: joins a room, owns local media, turns all of it into events.
// Both transports have the same small interface (start, connectTo, expect, handleSignal, remove, close,
// connections, restartIce); HuddleClient moves a call from one to the other (p2p -> sfu) without blanking a
// tile.
//
// Protocol: docs/protocol.md (version 1).

import { MEDIA_CONSTRAINTS, captureLocalMedia, withDevices } from './lib/devices.js';
import { HuddleError, emit } from './lib/errors.js';
import { Migration } from './lib/migration.js';
import { MeshTransport } from './lib/p2p.js';
import { captureScreen, screenOwner } from './lib/screen.js';
import {
  DEFAULT_RECONNECT_GRACE_S, RECONNECT_DELAYS_MS, Reconnector, joinFollowingRedirects,
} from './lib/reconnect.js';
import { SfuTransport } from './lib/sfu.js';
import {
  CLOSE_REMOVED, CLOSE_REPLACED, CLOSE_SERVICE_RESTART, CLOSE_UNAUTHORIZED, PROTOCOL_VERSION, ROOM_PATTERN,
  SignalingChannel, cleanDisplayName, defaultSignalingUrl,
} from './lib/signaling.js';
import { ICE_ALL, ICE_RELAY, hasTurnServer } from './lib/transport.js';

export { HuddleError } from './lib/errors.js';
export { MeshTransport } from './lib/p2p.js';
export { SFU_PUBLISH_ID, SFU_SUBSCRIBE_ID, SIMULCAST_ENCODINGS, SfuTransport } from './lib/sfu.js';
export {
  PROTOCOL_VERSION, ROOM_PATTERN, SignalingChannel, cleanDisplayName, defaultSignalingUrl,
} from './lib/signaling.js';
export { hasTurnServer } from './lib/transport.js';

export const STATES = Object.freeze(['idle', 'connecting', 'connected', 'reconnecting', 'disconnected', 'error']);

// `video_sizes` goes out at most this often (docs/protocol.md, "video_sizes").
const VIDEO_SIZES_INTERVAL_MS = 250;
const VIDEO_SIZES_ID_PREFIX = 'video-sizes-';
// Request ids of `start_recording` / `stop_recording`: the message type, '-', a number. The `error` event of a
// refused one names the request (detail.request), even when it comes after the request was settled.
const RECORDING_ID_PATTERN = /^(start_recording|stop_recording)-\d+$/;
// Request ids of `chat`: an `error` answering one (rate_limited, bad_message) has detail.request 'chat'.
const CHAT_ID_PREFIX = 'chat-';
// The chat kept on the page: the server's history (100) and what came since, within reason.
const CHAT_KEPT = 500;

/** A participant id from the server, or null (for null, missing or malformed ones). */
function cleanParticipantId(id) {
  return typeof id === 'string' && id ? id : null;
}

/** A running recording as the server describes it (docs/protocol.md, "Recording"), copied; else null. */
function cleanRecording(recording) {
  if (recording === null || typeof recording !== 'object' || typeof recording.id !== 'string') return null;
  return recording.state === 'recording' ? { ...recording } : null;
}

/** Whether two `video_sizes` maps say the same. */
function sameSizes(a, b) {
  if (!a || !b) return false;
  const keys = Object.keys(a);
  if (keys.length !== Object.keys(b).length) return false;
  return keys.every((id) => b[id] && a[id][0] === b[id][0] && a[id][1] === b[id][1]);
}

/**
 * A participant in a Huddle call.
 *
 * Events (CustomEvent, data in `detail`):
 *   state               {state, previous}  state: idle | connecting | connected | reconnecting | disconnected |
 *                                          error. `reconnecting`: the signaling socket dropped; media and
 *                                          participants are kept while a new socket resumes the call.
 *   joined              {self, room, participants, mode, iceServers, permissions, recording}
 *   resumed             {self, room, participants, mode, iceServers, permissions, recording, restored,
 *                                          moved}  back after `reconnecting`. restored: the server had lost
 *                                          the call (it restarted, or another node took it over) and rebuilt
 *                                          our seat; the SFU connections started afresh. moved: a different
 *                                          node serves the call now
 *   mode                {mode, previous}   the call moved to the SFU (previous 'p2p'), or back to p2p after a
 *                                          restored resume (a node that rebuilt the call without the SFU)
 *   participant-joined  {participant}
 *   participant-left    {participantId, participant, reason}
 *   participant-updated {participant, isSelf}  participant.connection: 'connected' | 'reconnecting'. After a
 *                                          restored resume, people not back yet stay 'reconnecting' until
 *                                          they are (or the grace period ends: participant-left, 'timeout')
 *   track               {participantId, stream, track}  stream: everything of that participant's to show
 *   track-removed       {participantId, stream, track}  the track left `stream` (SFU mode)
 *   screen              {stream}           our screen share started (its stream) or stopped (null)
 *   screen-track        {participantId, key, stream, track}  someone's screen share: `stream` holds its video
 *                                          (and audio); key '<participant id>~screen' (its `video_sizes` key)
 *   screen-track-removed {participantId, key, stream, track}  the track left that screen share's `stream`
 *   peer-state          {participantId, connectionState, iceConnectionState, state}  in SFU mode also for
 *                                          'sfu:publish' and 'sfu:subscribe'; a participant's is the state of
 *                                          the connection their media arrives on
 *   local-stream        {stream}           the local camera/microphone stream (null once released)
 *   local-media         {audio, video}     what this client sends, after setAudioEnabled / setVideoEnabled,
 *                                          and when a device stops (unplugged: `mediaError` name 'ended')
 *   active-speaker      {id, previous}     who speaks now (`activeSpeaker`; a participant id, possibly our
 *                                          own, or null), from the server's `active_speaker` and `joined`
 *   publisher-layers    {active}           SFU mode: the camera's simulcast layers some viewer needs (rids)
 *   recording           {recording, previous, reason}  the call's recording started or stopped. `recording`:
 *                                          the running one (also `this.recording`) or null; `previous`: the
 *                                          one running before (after a stop, as the server last described
 *                                          it: state 'processing', `stopped_at` set). reason: 'started' |
 *                                          'stopped' (someone started or stopped it), 'joined' (`joined` said
 *                                          otherwise, e.g. it changed while we were reconnecting), 'left' (our
 *                                          call ended)
 *   chat                {message}          a chat message ({id, from, name, text, at}) came, live or (after a
 *                                          resume) one missed meanwhile. `chat` holds them all, oldest first,
 *                                          with the history `joined` brought (read it on `joined`)
 *   error               {code, message, source: 'server' | 'local', fatal, requestId, request}  `request`:
 *                                          'start_recording' | 'stop_recording' when the error answers
 *                                          startRecording() / stopRecording() (which also reject)
 *
 * Always relay (`relayOnly`, an option and a property): every peer connection uses only the TURN relays of
 * `ice_servers` (iceTransportPolicy 'relay'), so that no other participant learns this browser's addresses.
 * Read whenever a connection is created (joining, the move to the SFU, a new participant); connections that
 * exist already keep the policy they were made with. A server that names no TURN server cannot relay: the
 * client says so (error `relay_unavailable`, not fatal) and still gathers no other candidates.
 *
 * Adaptive stream (SFU mode): the page tells the client how large each remote video is shown
 * (setVideoSizes); the client sends `video_sizes` when that changes, at most every 250 ms, and once whenever
 * the SFU transport starts or the call resumes. `lastVideoSizes` is the last `sizes` sent.
 */
export class HuddleClient extends EventTarget {
  constructor({
    url, mediaConstraints = MEDIA_CONSTRAINTS, pingInterval, silenceTimeout,
    reconnectDelays = RECONNECT_DELAYS_MS, relayOnly = false,
  } = {}) {
    super();
    this.url = url || null;
    this.relayOnly = Boolean(relayOnly);
    this.mediaConstraints = mediaConstraints;
    this._signalingOptions = { pingInterval, silenceTimeout };
    this.state = 'idle';
    this.self = null;
    this.room = null;
    this.mode = null; // 'p2p' | 'sfu' once joined
    this.iceServers = [];
    this.permissions = null;
    this.participants = new Map();
    this.localStream = null;
    this.mediaError = null;
    this.resumeToken = null;
    this.reconnectGrace = null; // seconds
    this._wantAudio = true;
    this._wantVideo = true;
    this._chosenDevices = {}; // {audioDeviceId, videoDeviceId} of the last useDevices(): asked for again on rejoin
    this._joinName = null;
    this._signaling = null;
    this._transport = null;
    this._migration = null; // the call moving away from its MeshTransport (p2p -> sfu), until that closed
    this._reconnector = new Reconnector({
      delays: reconnectDelays,
      host: {
        newChannel: (url) => this._newChannel(url),
        session: () => this._session,
        reconnecting: () => this.state === 'reconnecting',
        isSignaling: (channel) => this._signaling === channel,
        resumeRequest: () => {
          const request = { type: 'join', v: PROTOCOL_VERSION, room: this.room, resume: this.resumeToken };
          if (this._joinName) request.name = this._joinName;
          // A node that rebuilds the call from our token starts it where we were (no p2p -> sfu flap).
          if (this.mode === 'p2p' || this.mode === 'sfu') request.mode = this.mode;
          return request;
        },
        giveUp: (error) => this._giveUp(error),
      },
    });
    this._absent = new Map(); // participant id -> timer: known, not back yet after a restored resume
    this._session = 0;
    this.activeSpeaker = null; // participant id (maybe our own) or null
    this.recording = null; // the call's running recording ({id, outputs, started_at, started_by, ...}) or null
    this.chat = []; // the call's chat messages ({id, from, name, text, at}), oldest first
    this._chatIds = new Set();
    this._chatSent = 0;
    this._recordingRequests = new Map(); // request id -> {request, resolve, reject}, oldest first
    this._recordingRequestsSent = 0;
    // Adaptive stream: what the page shows (setVideoSizes), what went out last, and the throttle.
    this.lastVideoSizes = null; // {participantId: [w, h]} of the last `video_sizes` sent
    this.videoSizesSent = 0;
    this._videoSizes = {};
    this._videoSizesDue = false; // send once even if nothing changed (the SFU transport started, or resumed)
    this._videoSizesAt = -Infinity;
    this._videoSizesTimer = null;
    this.screen = null; // our screen share while it runs: {video, audio, stream} (startScreenShare)
  }

  get audioEnabled() {
    return Boolean(this._localTrack('audio')) && this._wantAudio;
  }

  get videoEnabled() {
    return Boolean(this._localTrack('video')) && this._wantVideo;
  }

  /** What the user asked for (setAudioEnabled / setVideoEnabled), applied whenever media is captured. */
  get mediaPreferences() {
    return { audio: this._wantAudio, video: this._wantVideo };
  }

  get hasAudio() {
    return Boolean(this._localTrack('audio'));
  }

  get hasVideo() {
    return Boolean(this._localTrack('video'));
  }

  /**
   * Joins `room` as `name` (open rooms) or with `token` (servers with a secret). Resolves with the `joined`
   * details; rejects with a HuddleError (also reported as an `error` event).
   */
  async join({ room, name, token } = {}) {
    if (this.state === 'connecting' || this.state === 'connected' || this.state === 'reconnecting') {
      throw this._fail(new HuddleError('already_joined', 'already in a call; leave it first'), false);
    }
    this._teardown();
    if (typeof room !== 'string' || !ROOM_PATTERN.test(room)) {
      this._setState('error');
      throw this._fail(new HuddleError('invalid_room', "room name must be 1-64 letters, digits, '-' or '_'"));
    }
    const displayName = name === undefined || name === null || name === '' ? null : cleanDisplayName(name);
    if ((name && displayName === null) || (!displayName && !token)) {
      this._setState('error');
      throw this._fail(new HuddleError('invalid_name', 'a display name of 1-64 characters is needed'));
    }

    const session = ++this._session;
    this._clearChat(); // a new call (a resume keeps it)
    this.room = room;
    this._joinName = displayName;
    this._setState('connecting');
    const signaling = this._newChannel();
    this._signaling = signaling;

    // Camera permission and the socket come up in parallel; `join` goes out once both are settled, so that
    // every peer connection is created with the local tracks in place.
    const media = this._ensureLocalMedia(session);
    try {
      await signaling.open();
      await media;
      if (session !== this._session) throw new HuddleError('aborted', 'left before the call was joined');
      const request = { type: 'join', v: PROTOCOL_VERSION, room };
      if (displayName) request.name = displayName;
      if (token) request.token = token;
      await joinFollowingRedirects(signaling, request, {
        newChannel: (url) => this._newChannel(url),
        adopt: (next) => {
          if (session !== this._session) return false;
          this._signaling = next;
          return true;
        },
      });
    } catch (err) {
      const error = err instanceof HuddleError ? err
        : new HuddleError('connection_failed', String(err?.message || err), { cause: err });
      if (session === this._session) {
        if (error.source !== 'server') this._fail(error);
        this._teardown();
        this._releaseLocalMedia();
        this._setState('error');
      }
      throw error;
    }
    return this._joinedDetail();
  }

  /**
   * Leaves the call, closes every connection and releases camera and microphone. Synchronous up to sending
   * `leave`, so that it works from `pagehide`.
   */
  leave() {
    this._session += 1;
    const signaling = this._signaling;
    let told = false;
    if (signaling) {
      // The server answers `leave` by closing the socket; close it ourselves if it does not.
      this._signaling = null;
      told = signaling.send({ type: 'leave' });
      if (told) setTimeout(() => signaling.close(1000, 'left'), 2000);
      else signaling.close(1000, 'left');
    }
    if (!told && this.resumeToken && this.room && navigator.sendBeacon) {
      // No socket to say it on (we are reconnecting): a beacon still gets out of a closing tab, so the others
      // do not wait out the grace period for us.
      navigator.sendBeacon(`/api/rooms/${encodeURIComponent(this.room)}/leave`, this.resumeToken);
    }
    this._reconnector.leave();
    this._teardown('self_left');
    this._releaseLocalMedia();
    this._setState('idle');
  }

  /**
   * Camera and microphone from the devices named (deviceIds; undefined or '' keep a working one, else take the
   * default). Before joining this captures them now, for a preview: join() then sends this stream, with no
   * second capture. In a call only what changed is captured, and the new track goes on every sender that
   * carried the old one (RTCRtpSender.replaceTrack, no renegotiation). Resolves with {stream, error}; `error`
   * (also `mediaError`, {name, words, kind}) says what could not be captured.
   */
  async useDevices({ audioDeviceId, videoDeviceId } = {}) {
    const ids = { audio: audioDeviceId, video: videoDeviceId };
    const wanted = {};
    for (const kind of ['audio', 'video']) {
      const current = this._localTrack(kind);
      if (!this.mediaConstraints[kind]) continue;
      if (current && (!ids[kind] || current.getSettings().deviceId === ids[kind])) continue;
      wanted[kind] = this.mediaConstraints[kind];
    }
    if (!wanted.audio && !wanted.video) return { stream: this.localStream, error: this.mediaError };
    const session = this._session;
    const { stream, error } = await captureLocalMedia(withDevices(wanted, { audioDeviceId, videoDeviceId }));
    if (session !== this._session) {
      // Left, or joined and left, while the browser was asking.
      for (const track of stream?.getTracks() || []) track.stop();
      return { stream: null, error: null };
    }
    for (const track of stream?.getTracks() || []) {
      this._chosenDevices[`${track.kind}DeviceId`] = track.getSettings().deviceId;
      await this._swapLocalTrack(track);
    }
    const working = (kind) => kind === 'both' ? this.hasAudio && this.hasVideo : Boolean(this._localTrack(kind));
    if (error) this.mediaError = error;
    else if (this.mediaError && working(this.mediaError.kind)) this.mediaError = null;
    if (stream) emit(this, 'local-stream', { stream: this.localStream });
    this._applyLocalMedia(true);
    return { stream: this.localStream, error };
  }

  /** Microphone on or off (track.enabled, no renegotiation); tells the others. Returns the new state. */
  setAudioEnabled(enabled) {
    this._wantAudio = Boolean(enabled);
    return this._applyLocalMedia().audio;
  }

  /** Camera on or off (track.enabled, no renegotiation); tells the others. Returns the new state. */
  setVideoEnabled(enabled) {
    this._wantVideo = Boolean(enabled);
    return this._applyLocalMedia().video;
  }

  /**
   * Adaptive stream: `sizes` maps remote participant ids to the size in device pixels their video is shown at,
   * [width, height]; [0, 0] (or leaving someone out) means not shown. Call it whenever a size may have
   * changed: in SFU mode a `video_sizes` goes out when they differ from the last one sent, at most every
   * 250 ms (the newest sizes win). In P2P mode nothing is sent; the sizes are kept for when the call moves to
   * the SFU.
   */
  setVideoSizes(sizes) {
    const clean = {};
    for (const [id, size] of Object.entries(sizes || {})) {
      if (!Array.isArray(size) || size.length !== 2) continue;
      const [w, h] = size.map((n) => (Number.isFinite(n) && n > 0 ? Math.round(n) : 0));
      clean[id] = w > 0 && h > 0 ? [w, h] : [0, 0];
    }
    this._videoSizes = clean;
    this._sendVideoSizes();
  }

  /**
   * Starts recording the call (the token needs `permissions.record`). `outputs`: some of 'composite' (the
   * speaker-view MP4) and 'tracks' (a file per track); both when left out. Resolves with the recording once
   * the server says it runs (the `recording` event comes at the same time); rejects with a HuddleError, also
   * reported as an `error` event with `request: 'start_recording'` (codes: forbidden, already_recording,
   * bad_request, unavailable, not_found, connection_lost). A p2p call moves to the SFU first (`mode`).
   */
  startRecording(outputs) {
    const message = { type: 'start_recording' };
    if (outputs !== undefined && outputs !== null) message.outputs = [...outputs];
    return this._recordingRequest(message);
  }

  /**
   * Stops the call's recording. Resolves with it as the server describes it once stopped (state
   * 'processing': its files are being finished and stored); rejects like startRecording (request
   * 'stop_recording'; codes: forbidden, not_recording, connection_lost).
   */
  stopRecording() {
    return this._recordingRequest({ type: 'stop_recording' });
  }

  /**
   * Sends `text` to everyone in the call (docs/protocol.md, "chat"); it comes back, to us too, as a `chat`
   * event. Returns whether it went out. A refusal (rate_limited, bad_message) is an `error` event with
   * `request: 'chat'`.
   */
  sendChat(text) {
    if (this.state !== 'connected' || !this._signaling) return false;
    this._chatSent += 1;
    return this._signaling.send({ type: 'chat', text: String(text), id: `${CHAT_ID_PREFIX}${this._chatSent}` });
  }

  /** Whether our hand is raised, as the server last said. */
  get handRaised() {
    return this.self?.hand === true;
  }

  /** Raises or lowers our hand; `participant-updated` (isSelf) follows once the server has it. */
  setHandRaised(raised) {
    if (this.state !== 'connected' || !this._signaling) return false;
    return this._signaling.send({ type: 'hand', raised: Boolean(raised) });
  }

  /**
   * Shares a screen, window or tab (the browser asks which), with its audio where the browser gives it, as a
   * track of its own (event `screen`). Resolves true once shared, false when the person closed the picker or
   * refused (nothing else happens). The browser's own "Stop sharing" ends it like stopScreenShare().
   */
  async startScreenShare() {
    if (this.screen) return true;
    if (this.state !== 'connected') return false;
    const session = this._session;
    let screen;
    try {
      screen = await captureScreen();
    } catch (err) {
      this._fail(new HuddleError('screen_unavailable', `the screen could not be shared: ${err.message}`,
        { cause: err }), false);
      return false;
    }
    if (!screen) return false;
    if (session !== this._session || this.state !== 'connected' || this.screen) {
      for (const track of screen.stream.getTracks()) track.stop();
      return Boolean(this.screen);
    }
    this.screen = screen;
    screen.video.addEventListener('ended', () => {
      if (this.screen === screen) this.stopScreenShare();
    });
    // Before the offer that carries it: a P2P peer tells the screen's stream apart by the id this names.
    this._announceScreen();
    this._transport?.setScreen(screen);
    emit(this, 'screen', { stream: screen.stream });
    return true;
  }

  /** Stops sharing the screen (its track ends for everyone). */
  stopScreenShare() {
    if (!this.screen) return;
    this._endScreenShare();
    this._announceScreen();
  }

  _endScreenShare() {
    const screen = this.screen;
    if (!screen) return;
    this.screen = null;
    this._transport?.setScreen(null);
    for (const track of screen.stream.getTracks()) track.stop();
    emit(this, 'screen', { stream: null });
  }

  /** Tells the others whether we share a screen (and, for P2P peers, which of our streams it is). */
  _announceScreen() {
    if (this.state !== 'connected' || !this._signaling) return;
    const message = { type: 'media', screen: Boolean(this.screen) };
    if (this.screen) message.screen_stream = this.screen.stream.id;
    this._signaling.send(message);
  }

  /** The camera's simulcast layers the server wants on (SFU mode; null until it said, meaning all). */
  get publisherLayers() {
    return this._transport instanceof SfuTransport ? this._transport.publisherLayers : null;
  }

  /**
   * [{participantId, pc}] for every current peer connection. P2P: one per remote participant. SFU:
   * {participantId: 'sfu:publish'} and {participantId: 'sfu:subscribe'}, followed, while a call moves from p2p
   * to the SFU, by the P2P connections not closed yet.
   */
  peerConnections() {
    const current = this._transport ? this._transport.connections() : [];
    const retiring = this._migration ? this._migration.connections() : [];
    return [...current, ...retiring];
  }

  // --- messages from the server ---

  _newChannel(url = this.url || defaultSignalingUrl()) {
    const channel = new SignalingChannel(url, this._signalingOptions);
    // Events of a channel this client has let go of (left, torn down, replaced) are ignored.
    channel.addEventListener('message', (event) => {
      if (this._signaling === channel) {
        this._onMessage(event.detail);
      } else if (this._reconnector.takeOver(channel, event.detail)) {
        this._signaling = channel;
        this._onResumed(event.detail);
      }
    });
    channel.addEventListener('close', (event) => {
      if (this._signaling === channel) this._onSignalingClosed(event.detail);
    });
    return channel;
  }

  _onMessage(message) {
    switch (message.type) {
      case 'joined':
        this._onJoined(message);
        break;
      case 'participant_joined':
        this._onParticipantJoined(message.participant);
        break;
      case 'participant_updated':
        this._onParticipantUpdated(message.participant);
        break;
      case 'participant_left':
        this._onParticipantLeft(message.id, message.reason);
        break;
      case 'offer':
      case 'answer':
      case 'candidate':
        if (this._transport instanceof MeshTransport && this.participants.has(message.from)) {
          this._transport.handleSignal(message);
        }
        break;
      case 'mode':
        if (message.mode === 'sfu') this._switchToSfu();
        break;
      case 'sfu_offer':
      case 'sfu_answer':
        // An SFU offer means the call is in the SFU, whether or not `mode` came first.
        if (message.type === 'sfu_offer' && message.pc === 'subscribe') this._switchToSfu();
        if (this._transport instanceof SfuTransport) this._transport.handleSignal(message);
        break;
      case 'publisher_layers':
        if (this._transport instanceof SfuTransport && Array.isArray(message.active)) {
          this._transport.setPublisherLayers(message.active);
          emit(this, 'publisher-layers', { active: [...message.active] });
        }
        break;
      case 'active_speaker':
        this._setActiveSpeaker(message.id);
        break;
      case 'recording':
        this._onRecording(message.recording);
        break;
      case 'chat':
        this._addChat(message.message, true);
        break;
      case 'resume_token':
        // What the call's state is now (a recording started or stopped), for whichever node resumes us.
        if (typeof message.token === 'string') this.resumeToken = message.token;
        break;
      case 'error':
        if (typeof message.id === 'string' && message.id.startsWith(VIDEO_SIZES_ID_PREFIX)) {
          // A server that does not know `video_sizes` yet (unknown_type): it sends every video anyway.
          console.debug('huddle: video_sizes refused:', message.code, message.message);
          break;
        }
        if (this._transport instanceof SfuTransport && typeof message.id === 'string') {
          this._transport.handleSignal(message);
        }
        this._settleRecordingRequest(message.id, null, new HuddleError(message.code,
          message.message || message.code, { source: 'server', requestId: message.id }));
        this._onServerError(message);
        break;
      default:
        break; // pong, and types from newer servers
    }
  }

  _onJoined(message) {
    this.self = { ...message.self };
    this.room = message.room || this.room;
    this.mode = message.mode === 'sfu' ? 'sfu' : 'p2p';
    this.iceServers = message.ice_servers || [];
    // The server always says; a reply without it grants only what joining itself gives.
    this.permissions = message.permissions || { publish: true, subscribe: true, record: false, download: false };
    this.resumeToken = typeof message.resume_token === 'string' ? message.resume_token : null;
    this.reconnectGrace = Number(message.reconnect_grace) > 0 ? Number(message.reconnect_grace)
      : DEFAULT_RECONNECT_GRACE_S;
    this.participants = new Map();
    for (const participant of message.participants || []) this.participants.set(participant.id, { ...participant });
    for (const chat of Array.isArray(message.chat) ? message.chat : []) this._addChat(chat, false);
    this._clearAbsent();
    this._reconnector.setDoors(message, this._signaling?.url);
    this._checkRelay();

    if (message.mode !== 'p2p' && message.mode !== 'sfu') {
      this._fail(new HuddleError('unsupported_mode', `this client cannot take part in a "${message.mode}" call`));
    }
    this._transport = this._createTransport(this.mode);
    this._transport.start();
    for (const id of this.participants.keys()) this._transport.connectTo(id);

    this.lastVideoSizes = null;
    this._videoSizesDue = this.mode === 'sfu';
    // Known before `joined`, so that the page's first layout (and first video_sizes) has the speaker large.
    const previousSpeaker = this.activeSpeaker;
    this.activeSpeaker = cleanParticipantId(message.active_speaker);
    const previousRecording = this.recording;
    this.recording = cleanRecording(message.recording);
    this._setState('connected');
    emit(this, 'joined', this._joinedDetail());
    this._applyLocalMedia(true);
    if (this.activeSpeaker !== previousSpeaker) {
      emit(this, 'active-speaker', { id: this.activeSpeaker, previous: previousSpeaker });
    }
    if (this.recording?.id !== previousRecording?.id) {
      emit(this, 'recording', { recording: this.recording, previous: previousRecording, reason: 'joined' });
    }
    this._sendVideoSizes(); // once right after the SFU transport started (the page had its say in `joined`)
  }

  _onParticipantJoined(participant) {
    if (!participant || typeof participant.id !== 'string' || participant.id === this.self?.id) return;
    if (this.participants.has(participant.id)) {
      // Someone kept through a restored resume, back in the rebuilt call: the same tile and, in p2p mode, the
      // same peer connection (ICE restarts as after any resume).
      this._onParticipantUpdated({ connection: 'connected', ...participant });
      return;
    }
    this.participants.set(participant.id, { ...participant });
    emit(this, 'participant-joined', { participant: this.participants.get(participant.id) });
    // After the event, so that tracks the SFU delivered before we heard of them find a tile.
    this._transport?.expect(participant.id);
  }

  _onParticipantUpdated(participant, { restartIce = true } = {}) {
    if (!participant || typeof participant.id !== 'string') return;
    if (this.self && participant.id === this.self.id) {
      Object.assign(this.self, participant);
      emit(this, 'participant-updated', { participant: this.self, isSelf: true });
      return;
    }
    const known = this.participants.get(participant.id);
    if (!known) return;
    this._clearAbsent(participant.id); // the server knows about them again: its grace period applies
    const wasReconnecting = known.connection === 'reconnecting';
    Object.assign(known, participant);
    emit(this, 'participant-updated', { participant: known, isSelf: false });
    if (restartIce && wasReconnecting && known.connection === 'connected'
      && this._transport instanceof MeshTransport) {
      // They resumed: in p2p mode the later joiner of the two restarts ICE (a no-op when that is them).
      this._transport.restartIce(participant.id);
    }
  }

  _onParticipantLeft(participantId, reason) {
    this._clearAbsent(participantId);
    const participant = this.participants.get(participantId);
    this._transport?.remove(participantId);
    this._migration?.remove(participantId);
    if (!participant) return;
    this.participants.delete(participantId);
    emit(this, 'participant-left', { participantId, participant, reason: reason || 'left' });
    // Whoever left speaks no more (the server's next `active_speaker` says who does).
    if (this.activeSpeaker === participantId) this._setActiveSpeaker(null);
  }

  /**
   * After a restored resume: someone the rebuilt call has not seen again yet keeps their tile, marked
   * 'reconnecting', until they are back or the grace period is over (then they are gone, as if the server
   * had timed them out).
   */
  _markAbsent(participantId) {
    const known = this.participants.get(participantId);
    if (!known) return;
    clearTimeout(this._absent.get(participantId));
    const graceMs = (this.reconnectGrace || DEFAULT_RECONNECT_GRACE_S) * 1000;
    this._absent.set(participantId, setTimeout(() => {
      this._absent.delete(participantId);
      this._onParticipantLeft(participantId, 'timeout');
    }, graceMs));
    if (known.connection === 'reconnecting') return;
    known.connection = 'reconnecting';
    emit(this, 'participant-updated', { participant: known, isSelf: false });
  }

  /** Stops waiting for `participantId` (every participant when left out). */
  _clearAbsent(participantId) {
    const ids = participantId === undefined ? [...this._absent.keys()] : [participantId];
    for (const id of ids) {
      clearTimeout(this._absent.get(id));
      this._absent.delete(id);
    }
  }

  _setActiveSpeaker(id) {
    const speaker = cleanParticipantId(id);
    if (speaker === this.activeSpeaker) return;
    const previous = this.activeSpeaker;
    this.activeSpeaker = speaker;
    emit(this, 'active-speaker', { id: speaker, previous });
  }

  // --- adaptive stream (docs/protocol.md, "video_sizes") ---

  /**
   * Sends the page's video sizes when they differ from the last ones sent (or a send is due), in SFU mode
   * only, at most once per VIDEO_SIZES_INTERVAL_MS: a change within that time goes out when it is over.
   */
  _sendVideoSizes() {
    if (this.mode !== 'sfu' || !(this._transport instanceof SfuTransport) || this.state !== 'connected'
      || !this._signaling) {
      return; // kept: the next start of the SFU transport, or the resume, sends them
    }
    const sizes = {};
    // Only people in the call: a tile the page has not removed yet must not name someone who left.
    for (const [id, size] of Object.entries(this._videoSizes)) {
      if (this.participants.has(id) || this.participants.has(screenOwner(id))) sizes[id] = size;
    }
    if (!this._videoSizesDue && sameSizes(sizes, this.lastVideoSizes)) return;
    const wait = this._videoSizesAt + VIDEO_SIZES_INTERVAL_MS - performance.now();
    if (wait > 0) {
      if (!this._videoSizesTimer) {
        this._videoSizesTimer = setTimeout(() => {
          this._videoSizesTimer = null;
          this._sendVideoSizes();
        }, wait);
      }
      return;
    }
    // The id only comes back on an `error` (e.g. unknown_type from an older server), which is then ignored.
    const id = `${VIDEO_SIZES_ID_PREFIX}${this.videoSizesSent + 1}`;
    if (!this._signaling.send({ type: 'video_sizes', id, sizes })) return;
    this.videoSizesSent += 1;
    this._videoSizesAt = performance.now();
    this._videoSizesDue = false;
    this.lastVideoSizes = sizes;
  }

  _stopVideoSizes() {
    clearTimeout(this._videoSizesTimer);
    this._videoSizesTimer = null;
    this._videoSizesDue = false;
  }

  // --- recording (docs/protocol.md, "Recording") ---

  /**
   * Sends a start_recording / stop_recording. The server answers a success with the `recording` message it
   * sends everyone, which carries no request id, and a refusal with an `error` that does; so these are
   * matched here (_onRecording, _settleRecordingRequest), not by SignalingChannel.request.
   */
  _recordingRequest(message) {
    return new Promise((resolve, reject) => {
      this._recordingRequestsSent += 1;
      const id = `${message.type}-${this._recordingRequestsSent}`;
      this._recordingRequests.set(id, { request: message.type, resolve, reject });
      const sent = this.state === 'connected' && this._signaling && this._signaling.send({ ...message, id });
      if (!sent) {
        const error = new HuddleError('connection_lost', 'not connected to the call', { requestId: id });
        this._settleRecordingRequest(id, null, error);
        this._fail(error, false, { requestId: id, request: message.type });
      }
    });
  }

  /** Resolves (`error` null) or rejects the recording request `id`, if it is still waiting. */
  _settleRecordingRequest(id, result, error) {
    const pending = this._recordingRequests.get(id);
    if (!pending) return;
    this._recordingRequests.delete(id);
    if (error) pending.reject(error);
    else pending.resolve(result);
  }

  /** The socket the requests went out on is gone: their answers are lost with it. */
  _rejectRecordingRequests(report) {
    for (const [id, { request }] of [...this._recordingRequests]) {
      const error = new HuddleError('connection_lost', `the connection was lost before ${request} was answered`);
      this._settleRecordingRequest(id, null, error);
      if (report) this._fail(error, false, { requestId: id, request });
    }
  }

  _onRecording(recording) {
    if (recording === null || typeof recording !== 'object' || typeof recording.id !== 'string') return;
    const running = recording.state === 'recording';
    // The server handles one socket's messages in order and answers each before reading the next, so a
    // `recording` answers our oldest request of its kind. A start is ours only if we started it (when someone
    // else's came first, ours gets already_recording after this). Any stop settles a stop of ours: one that
    // lost the race gets not_recording later, when nothing waits for it any more.
    const kind = running ? 'start_recording' : 'stop_recording';
    for (const [id, pending] of this._recordingRequests) {
      if (pending.request !== kind) continue;
      if (!running || recording.started_by === this.self?.id) this._settleRecordingRequest(id, { ...recording });
      break;
    }
    if (running) {
      this._setRecording({ ...recording }, 'started');
    } else if (this.recording && this.recording.id === recording.id) {
      this._setRecording(null, 'stopped', { ...recording });
    }
  }

  /** `recording`: the running one or null. `previous` defaults to the one that ran until now. */
  _setRecording(recording, reason, previous = this.recording) {
    if ((recording?.id ?? null) === (this.recording?.id ?? null)) {
      if (recording) this.recording = recording; // the same one, described again
      return;
    }
    this.recording = recording;
    emit(this, 'recording', { recording, previous, reason });
  }

  // --- chat (docs/protocol.md, "chat") ---

  /** Keeps a chat message from the server once (by id); `announce`: as a `chat` event. */
  _addChat(message, announce) {
    if (message === null || typeof message !== 'object' || typeof message.id !== 'string'
      || typeof message.text !== 'string' || this._chatIds.has(message.id)) {
      return;
    }
    const kept = {
      id: message.id,
      from: typeof message.from === 'string' ? message.from : null,
      name: typeof message.name === 'string' ? message.name : '',
      text: message.text,
      at: Number.isFinite(message.at) ? message.at : Date.now() / 1000,
    };
    this.chat.push(kept);
    this._chatIds.add(kept.id);
    if (this.chat.length > CHAT_KEPT) this._chatIds.delete(this.chat.shift().id);
    if (announce) emit(this, 'chat', { message: kept });
  }

  _clearChat() {
    this.chat = [];
    this._chatIds = new Set();
  }

  _onServerError(message) {
    const fatalCodes = ['unauthorized', 'token_expired', 'wrong_room', 'invalid_room', 'invalid_name',
      'room_full', 'already_joined', 'not_joined'];
    const fatal = this.state === 'connecting' && fatalCodes.includes(message.code);
    const detail = {
      code: message.code, message: message.message || message.code, source: 'server', fatal,
      requestId: message.id,
    };
    const recordingRequest = typeof message.id === 'string' && message.id.match(RECORDING_ID_PATTERN);
    if (recordingRequest) detail.request = recordingRequest[1];
    else if (typeof message.id === 'string' && message.id.startsWith(CHAT_ID_PREFIX)) detail.request = 'chat';
    emit(this, 'error', detail);
  }

  _onSignalingClosed({ code, lost }) {
    const wasConnected = this.state === 'connected';
    const final = [CLOSE_UNAUTHORIZED, CLOSE_REPLACED, CLOSE_REMOVED].includes(code);
    if (wasConnected && this.resumeToken && !final) {
      // Keep the call (media, participants, tiles) and resume it on a new socket.
      this._signaling = null;
      this._rejectRecordingRequests(true);
      this._startReconnecting({ serviceRestart: code === CLOSE_SERVICE_RESTART });
      return;
    }
    this._teardown('connection_lost');
    if (!wasConnected) return; // while connecting, join() reports it through its rejection
    if (code === CLOSE_REPLACED) {
      this._fail(new HuddleError('replaced', 'you joined this call again from another tab or device'));
    } else if (code === CLOSE_REMOVED) {
      this._fail(new HuddleError('removed', 'the server ended your connection to the call'));
    } else {
      this._fail(new HuddleError('connection_lost', lost
        ? 'no word from the server for 12 seconds' : `the server closed the connection (${code})`));
    }
    this._setState('disconnected');
  }

  // --- reconnection (docs/protocol.md, "Reconnection"; lib/reconnect.js) ---

  /**
   * Resumes the call on a new socket, trying the doors in turn: the one the call was on first, unless that
   * node said it stops serving (close code 1012), in which case another door goes first and at once.
   */
  _startReconnecting({ serviceRestart = false } = {}) {
    this._setState('reconnecting');
    this._reconnector.start({
      session: this._session,
      graceS: this.reconnectGrace || DEFAULT_RECONNECT_GRACE_S,
      fallbackUrl: this.url || defaultSignalingUrl(),
      serviceRestart,
    });
  }

  /** The call could not be resumed: end it here (state `disconnected`; the page offers to rejoin). */
  _giveUp(error) {
    this._reconnector.stop();
    this._teardown('connection_lost');
    this._fail(error);
    this._setState('disconnected');
  }

  _onResumed(message) {
    this._reconnector.stop();
    if (message.resumed !== true || !this.self || message.self?.id !== this.self.id) {
      // A fresh seat rather than ours (the server no longer knew us): start over on this socket.
      this._closeTransports();
      for (const [participantId, participant] of [...this.participants]) {
        this.participants.delete(participantId);
        emit(this, 'participant-left', { participantId, participant, reason: 'rejoined' });
      }
      this._onJoined(message);
      return;
    }
    this.self = { ...message.self };
    this.iceServers = message.ice_servers || this.iceServers;
    this.permissions = message.permissions || this.permissions;
    if (typeof message.resume_token === 'string') this.resumeToken = message.resume_token;
    if (Number(message.reconnect_grace) > 0) this.reconnectGrace = Number(message.reconnect_grace);
    // Restored: the node had no state for us (it restarted, or took the call over) and rebuilt our seat from
    // the resume token. It knows only those who are back already.
    const restored = message.restored === true;
    const moved = this._reconnector.setDoors(message, this._signaling?.url);

    // What happened while we were away: who left, who came, who changed.
    const now = new Map((message.participants || []).map((p) => [p.id, p]));
    for (const id of [...this.participants.keys()]) {
      if (now.has(id)) continue;
      if (restored) this._markAbsent(id);
      else this._onParticipantLeft(id, 'left');
    }
    for (const [id, participant] of now) {
      // No ICE restart per participant here: the one restart below covers every connection.
      if (this.participants.has(id)) this._onParticipantUpdated(participant, { restartIce: false });
      else this._onParticipantJoined(participant);
    }

    const switching = message.mode === 'sfu' && !(this._transport instanceof SfuTransport);
    if (switching) {
      this._switchToSfu(); // new connections: nothing to restart
    } else if (restored && this._transport instanceof SfuTransport) {
      if (message.mode === 'p2p') this._restartAsMesh([...now.keys()]);
      else this._restartSfu();
    } else {
      // SFU: a publish offer with iceRestart (the server sends a new subscribe offer of its own).
      // P2P: every connection we initiated (we joined after them) offers with iceRestart.
      this._transport?.restartIce();
    }
    // The recording may have started or stopped while we were away (a server without recording says nothing).
    const previousRecording = this.recording;
    if ('recording' in message) this.recording = cleanRecording(message.recording);
    this._setState('connected');
    emit(this, 'resumed', { ...this._joinedDetail(), restored, moved });
    // Messages posted while we were away; those we have already are not shown twice.
    for (const chat of Array.isArray(message.chat) ? message.chat : []) this._addChat(chat, true);
    this._applyLocalMedia(true);
    if (Boolean(this.self.screen) !== Boolean(this.screen)) this._announceScreen(); // a rebuilt seat forgot it
    if ('active_speaker' in message) this._setActiveSpeaker(message.active_speaker);
    if (this.recording?.id !== previousRecording?.id) {
      emit(this, 'recording', { recording: this.recording, previous: previousRecording, reason: 'joined' });
    }
    // The sizes may have changed while we were away: say them again (_switchToSfu has just done so).
    if (!switching) this._videoSizesDue = true;
    this._sendVideoSizes();
  }

  // --- transports ---

  _createTransport(mode) {
    let transport = null;
    const options = {
      iceServers: this.iceServers,
      iceTransportPolicy: this.relayOnly ? ICE_RELAY : ICE_ALL,
      localTracks: this._localTracks(),
      permissions: this.permissions,
      send: (msg) => (this._signaling ? this._signaling.send(msg) : false),
      events: this._transportEvents(() => transport),
      screen: this.screen,
      screenStreamOf: (participantId) => {
        const participant = this.participants.get(participantId);
        return participant?.screen === true ? participant.screen_stream || null : null;
      },
    };
    transport = mode === 'sfu' ? new SfuTransport(options) : new MeshTransport(options);
    return transport;
  }

  _transportEvents(transportOf) {
    return {
      track: (participantId, stream, track) => {
        const transport = transportOf();
        if (screenOwner(participantId) !== null) {
          this._onScreenTrack('screen-track', transport, participantId, stream, track);
          return;
        }
        if (transport === this._migration?.mesh) {
          // Late P2P media of someone still waiting for their SFU media.
          if (this._migration.waitsFor(participantId)) emit(this, 'track', { participantId, stream, track });
        } else if (transport === this._transport && !this._waitsForSfu(participantId)) {
          emit(this, 'track', { participantId, stream, track });
        }
        // SFU media of someone still on P2P: shown once it flows (lib/migration.js).
      },
      trackRemoved: (participantId, stream, track) => {
        if (screenOwner(participantId) !== null) {
          this._onScreenTrack('screen-track-removed', transportOf(), participantId, stream, track);
          return;
        }
        if (transportOf() === this._transport && !this._waitsForSfu(participantId)) {
          emit(this, 'track-removed', { participantId, stream, track });
        }
      },
      peerState: (participantId, states) => {
        // A retiring P2P connection's states say nothing about the call any more.
        if (transportOf() !== this._transport || this._waitsForSfu(participantId)) return;
        emit(this, 'peer-state', { participantId, ...states });
      },
      error: (error) => {
        if (transportOf() === this._transport) this._fail(error, false);
      },
    };
  }

  /**
   * A screen share's track came or went. While the call moves p2p -> sfu, the P2P copy counts only until the
   * SFU's comes (the share is on the stage at once, rather than after the migration).
   */
  _onScreenTrack(type, transport, key, stream, track) {
    const current = transport === this._transport;
    const retiring = transport === this._migration?.mesh && !this._transport?.streams?.has(key);
    if (current || retiring) emit(this, type, { participantId: screenOwner(key), key, stream, track });
  }

  /**
   * p2p -> sfu (`mode`, or `joined` after a resume): the SFU transport starts at once; each P2P connection
   * that carries media stays until that participant's media flows through the SFU (or a time limit), so that
   * no tile goes blank.
   */
  _switchToSfu() {
    if (this._transport instanceof SfuTransport || !this.self) return;
    const previous = this.mode;
    const mesh = this._transport instanceof MeshTransport ? this._transport : null;
    this.mode = 'sfu';
    this._transport = this._createTransport('sfu');
    if (mesh) {
      mesh.retire(); // closes the connections that never carried media
      if (mesh.links.size > 0) {
        const migration = new Migration(mesh, {
          transport: () => this._transport,
          finished: (participantId) => this._showSfuMedia(participantId),
          done: () => {
            if (this._migration === migration) this._migration = null;
          },
        });
        this._migration = migration;
      } else {
        mesh.close();
      }
    }
    this._transport.start();
    for (const id of this.participants.keys()) this._transport.expect(id);
    this._videoSizesDue = true;
    emit(this, 'mode', { mode: 'sfu', previous });
    this._sendVideoSizes(); // once right after the SFU transport started (the page had its say in `mode`)
  }

  /**
   * The node lost our SFU state (a restored resume): close both SFU connections and start afresh, as on
   * entering sfu mode (a new publish offer; the server's subscribe offers follow). The tiles wait for the new
   * connection's media ("Connecting…").
   */
  _restartSfu() {
    this._transport.close();
    this._transport = this._createTransport('sfu');
    this._transport.start();
    const states = this._transport.subscribeState();
    for (const participantId of this.participants.keys()) {
      if (!this._waitsForSfu(participantId)) emit(this, 'peer-state', { participantId, ...states });
    }
    this._videoSizesDue = true;
  }

  /**
   * The node rebuilt the call peer to peer although we were on the SFU (it did not take our `mode`): connect
   * as a newcomer would, offering to those back already (those who come back later offer to us), until the
   * call moves to the SFU again.
   */
  _restartAsMesh(present) {
    this._closeTransports();
    this.mode = 'p2p';
    this._transport = this._createTransport('p2p');
    for (const participantId of present) this._transport.connectTo(participantId);
    emit(this, 'mode', { mode: 'p2p', previous: 'sfu' });
  }

  /** Whether `participantId`'s tile still shows their P2P media while the call moves to the SFU. */
  _waitsForSfu(participantId) {
    return Boolean(this._migration?.waitsFor(participantId));
  }

  /** Moving p2p -> sfu: `participantId`'s SFU media flows (or waited long enough); their tile shows it. */
  _showSfuMedia(participantId) {
    const sfu = this._transport;
    if (!(sfu instanceof SfuTransport)) return;
    const stream = sfu.streams.get(participantId);
    for (const track of stream ? stream.getTracks() : []) emit(this, 'track', { participantId, stream, track });
    if (stream) emit(this, 'peer-state', { participantId, ...sfu.subscribeState() });
  }

  _closeTransports() {
    if (this._migration) {
      this._migration.close();
      this._migration = null;
    }
    if (this._transport) {
      this._transport.close();
      this._transport = null;
    }
  }

  /** Always relay without a relay to use: no connection can be made, and the person should know why. */
  _checkRelay() {
    if (this.relayOnly && !hasTurnServer(this.iceServers)) {
      this._fail(new HuddleError('relay_unavailable',
        'always relay is on, but the server offers no TURN relay: calls cannot connect'), false);
    }
  }

  _localTracks() {
    return {
      audio: this._localTrack('audio'),
      video: this._localTrack('video'),
      stream: this.localStream,
    };
  }

  _localTrack(kind) {
    if (!this.localStream) return null;
    const tracks = kind === 'audio' ? this.localStream.getAudioTracks() : this.localStream.getVideoTracks();
    return tracks.find((track) => track.readyState === 'live') || null;
  }

  // --- local media ---

  async _ensureLocalMedia(session) {
    if (this._localTrack('audio') || this._localTrack('video')) return;
    // The devices chosen before (useDevices) if they are still there, else the default ones.
    const constraints = withDevices(this.mediaConstraints, this._chosenDevices, { ideal: true });
    const { stream, error } = await captureLocalMedia(constraints);
    if (session !== this._session) {
      // Left while the browser was asking for the camera.
      for (const track of stream?.getTracks() || []) track.stop();
      return;
    }
    this.localStream = stream;
    this.mediaError = error;
    for (const track of stream?.getTracks() || []) this._watchTrack(track);
    if (stream) {
      const audio = this._localTrack('audio');
      const video = this._localTrack('video');
      if (audio) audio.enabled = this._wantAudio;
      if (video) video.enabled = this._wantVideo;
      emit(this, 'local-stream', { stream });
    }
    if (error) {
      const what = stream ? 'joining without it' : 'joining without sending audio or video';
      this._fail(new HuddleError('media_unavailable', `${error.words}; ${what}`), false, { mediaError: error.name });
    }
  }

  /**
   * `track` in place of our track of its kind: in `localStream` (a new MediaStream, so that video elements
   * showing it pick the change up), on every sender of the old one, and in the transports' local tracks (for
   * connections made later). The old track is stopped.
   */
  async _swapLocalTrack(track) {
    const kind = track.kind;
    const old = this.localStream ? this.localStream.getTracks().filter((t) => t.kind === kind) : [];
    const others = this.localStream ? this.localStream.getTracks().filter((t) => t.kind !== kind) : [];
    this.localStream = new MediaStream([...others, track]);
    track.enabled = kind === 'audio' ? this._wantAudio : this._wantVideo;
    this._watchTrack(track);
    const replaced = [];
    for (const { pc } of this.peerConnections()) {
      for (const sender of pc.getSenders()) {
        if (sender.track && old.includes(sender.track)) replaced.push(sender.replaceTrack(track));
      }
    }
    const transports = [this._transport, this._migration?.mesh].filter((t) => t?.localTracks);
    for (const transport of transports) transport.localTracks[kind] = track;
    try {
      await Promise.all(replaced);
    } catch (err) {
      this._fail(new HuddleError('peer_error', `could not switch the ${kind} device: ${err.message}`), false);
    }
    // No sender carried this kind (the device came after the call started): the SFU publishes it anew.
    if (!replaced.length && this._transport instanceof SfuTransport) {
      this._transport.setLocalTracks(this._localTracks());
    }
    for (const t of old) t.stop();
  }

  /** A device unplugged (or taken by the system) ends its track: say so, and tell the others it is off. */
  _watchTrack(track) {
    track.addEventListener('ended', () => {
      if (!this.localStream?.getTracks().includes(track)) return; // replaced or released on purpose
      this.mediaError = { name: 'ended', words: `the ${track.kind === 'audio' ? 'microphone' : 'camera'} stopped`,
        kind: track.kind };
      this._applyLocalMedia(true);
    });
  }

  _releaseLocalMedia() {
    if (!this.localStream) return;
    for (const track of this.localStream.getTracks()) track.stop();
    this.localStream = null;
    emit(this, 'local-stream', { stream: null });
  }

  /** Applies the wanted mic/camera state to the tracks and tells the server when it differs from `self`. */
  _applyLocalMedia(onlyIfChanged = false) {
    const audio = this._localTrack('audio');
    const video = this._localTrack('video');
    if (audio) audio.enabled = this._wantAudio;
    if (video) video.enabled = this._wantVideo;
    const publish = this.permissions?.publish !== false;
    const state = { audio: this.audioEnabled && publish, video: this.videoEnabled && publish };
    if (this.state === 'connected' && this._signaling) {
      const changed = !this.self || this.self.audio !== state.audio || this.self.video !== state.video;
      if (changed || !onlyIfChanged) this._signaling.send({ type: 'media', ...state });
    }
    emit(this, 'local-media', state);
    return state;
  }

  // --- helpers ---

  _teardown(reason) {
    // Said on purpose (leave): nothing to report about requests that no longer matter.
    this._rejectRecordingRequests(reason !== 'self_left');
    this._reconnector.stop();
    this._clearAbsent();
    this._stopVideoSizes();
    this._endScreenShare();
    this._closeTransports();
    if (this._signaling) {
      const signaling = this._signaling;
      this._signaling = null;
      signaling.close(1000, 'leaving');
    }
    if (reason) {
      for (const [participantId, participant] of [...this.participants]) {
        this.participants.delete(participantId);
        emit(this, 'participant-left', { participantId, participant, reason });
      }
    }
    this.participants = new Map();
    this.self = null;
    this.resumeToken = null;
    this._reconnector.forgetDoors();
    this.lastVideoSizes = null;
    if (this.activeSpeaker !== null) this._setActiveSpeaker(null);
    if (this.recording !== null) this._setRecording(null, 'left');
  }

  _fail(error, fatal = true, extra = {}) {
    emit(this, 'error', {
      code: error.code, message: error.message, source: error.source || 'local', fatal, ...extra,
    });
    return error;
  }

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    emit(this, 'state', { state, previous });
  }

  _joinedDetail() {
    return {
      self: this.self,
      room: this.room,
      participants: [...this.participants.values()],
      mode: this.mode,
      iceServers: this.iceServers,
      permissions: this.permissions,
      recording: this.recording,
    };
  }
}
