// Huddle browser SDK: signaling, local media and peer connections. No DOM or UI code lives here.
//
// Three layers, each replaceable on its own:
//   SignalingChannel  one WebSocket: JSON frames, request ids, ping every 5 s, 12 s of silence = lost.
//   MeshTransport     "p2p" mode: one RTCPeerConnection (PeerLink) per remote participant.
//   HuddleClient      the public API: joins a room, owns local media, turns all of it into events.
// An SFU mode is another transport with the same small interface (start, connectTo, expect, handleSignal,
// remove, close, connections); reconnection lives in HuddleClient, around SignalingChannel.
//
// Protocol: docs/protocol.md (version 1).

export const PROTOCOL_VERSION = 1;
export const ROOM_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
export const STATES = Object.freeze(['idle', 'connecting', 'connected', 'disconnected', 'error']);

const PING_INTERVAL_MS = 5000;
const SILENCE_TIMEOUT_MS = 12000;
const MEDIA_CONSTRAINTS = Object.freeze({ audio: true, video: { width: 1280, height: 720 } });
const MAX_ICE_RESTARTS = 3;
const CLOSE_REPLACED = 4002; // the server's close code when the same identity joined again elsewhere

/** An error with a protocol code (`code`) as well as words for people (`message`). */
export class HuddleError extends Error {
  constructor(code, message, { source = 'local', fatal = false, requestId = undefined, cause } = {}) {
    super(message, cause ? { cause } : undefined);
    this.name = 'HuddleError';
    this.code = code;
    this.source = source; // 'server' | 'local'
    this.fatal = fatal;
    this.requestId = requestId;
  }
}

/** Display names as the server accepts them: white space collapsed, 1-64 characters. */
export function cleanDisplayName(name) {
  if (typeof name !== 'string') return null;
  const cleaned = name.trim().split(/\s+/).join(' ');
  return cleaned.length >= 1 && cleaned.length <= 64 ? cleaned : null;
}

export function defaultSignalingUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws`;
}

function emit(target, type, detail) {
  target.dispatchEvent(new CustomEvent(type, { detail }));
}

// ---------------------------------------------------------------------------------------------------------
// Signaling

/**
 * One WebSocket speaking the Huddle protocol. Events: `message` (detail: the parsed server message) for every
 * frame, and `close` (detail: {code, reason, lost, wasOpen}) once, when the socket is gone for any reason.
 */
export class SignalingChannel extends EventTarget {
  constructor(url, { pingInterval = PING_INTERVAL_MS, silenceTimeout = SILENCE_TIMEOUT_MS } = {}) {
    super();
    this.url = url;
    this.pingInterval = pingInterval;
    this.silenceTimeout = silenceTimeout;
    this.ws = null;
    this.lastMessageAt = 0;
    this.rttMs = null;
    this._nextId = 1;
    this._pending = new Map(); // request id -> {resolve, reject, sentAt}
    this._timers = [];
    this._closed = false;
    this._wasOpen = false;
    this._rejectOpen = null;
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Opens the socket; resolves once it is open, rejects when it cannot be opened. */
  open() {
    return new Promise((resolve, reject) => {
      this._rejectOpen = reject;
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (err) {
        reject(new HuddleError('connection_failed', `cannot open ${this.url}: ${err.message}`, { cause: err }));
        return;
      }
      this.ws = ws;
      ws.onopen = () => {
        this._wasOpen = true;
        this.lastMessageAt = performance.now();
        this._startHeartbeat();
        resolve();
      };
      ws.onmessage = (event) => this._onFrame(event.data);
      ws.onerror = () => {
        // A close event always follows; it carries the details.
      };
      ws.onclose = (event) => this._finish({ code: event.code, reason: event.reason, lost: false });
    });
  }

  /** Sends one message; returns false when the socket is not open. */
  send(message) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  /**
   * Sends a message with a fresh request id and resolves with the server's reply carrying that id. An `error`
   * reply rejects with a HuddleError (source 'server'); so does the socket closing first.
   */
  request(message) {
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      if (!this.send({ ...message, id })) {
        reject(new HuddleError('connection_lost', 'not connected to the server'));
        return;
      }
      this._pending.set(id, { resolve, reject, sentAt: performance.now() });
    });
  }

  /** Closes the socket from this side. */
  close(code = 1000, reason = '') {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) {
      try {
        this.ws.close(code, reason);
      } catch {
        this.ws.close();
      }
    }
    this._finish({ code, reason, lost: false });
  }

  _onFrame(data) {
    this.lastMessageAt = performance.now();
    if (typeof data !== 'string') return;
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (message === null || typeof message !== 'object' || typeof message.type !== 'string') return;
    emit(this, 'message', message);
    if (message.id !== undefined && message.id !== null && this._pending.has(message.id)) {
      const pending = this._pending.get(message.id);
      this._pending.delete(message.id);
      if (message.type === 'error') {
        pending.reject(new HuddleError(message.code, message.message || message.code, {
          source: 'server', requestId: message.id,
        }));
      } else {
        if (message.type === 'pong') this.rttMs = performance.now() - pending.sentAt;
        pending.resolve(message);
      }
    }
  }

  _startHeartbeat() {
    this._timers.push(setInterval(() => {
      // Pongs need no waiting for: any frame from the server counts as a sign of life.
      if (this.isOpen) {
        const id = this._nextId++;
        this._pending.set(id, { resolve: () => {}, reject: () => {}, sentAt: performance.now() });
        this.send({ type: 'ping', id });
      }
    }, this.pingInterval));
    this._timers.push(setInterval(() => {
      if (performance.now() - this.lastMessageAt > this.silenceTimeout) {
        const ws = this.ws;
        this._finish({ code: 4000, reason: 'no message from the server', lost: true });
        try {
          ws.close(4000, 'heartbeat timeout');
        } catch {
          // already closing
        }
      }
    }, Math.min(1000, this.silenceTimeout / 4)));
  }

  _finish({ code, reason, lost }) {
    if (this._closed) return;
    this._closed = true;
    if (!this._wasOpen && this._rejectOpen) {
      this._rejectOpen(new HuddleError('connection_failed', 'could not reach the Huddle server'));
    }
    this._rejectOpen = null;
    for (const timer of this._timers) clearInterval(timer);
    this._timers = [];
    if (this.ws) {
      this.ws.onopen = this.ws.onmessage = this.ws.onclose = this.ws.onerror = null;
    }
    const error = new HuddleError('connection_lost', 'the connection to the server was closed');
    for (const pending of this._pending.values()) pending.reject(error);
    this._pending.clear();
    emit(this, 'close', { code, reason, lost, wasOpen: this._wasOpen });
  }
}

// ---------------------------------------------------------------------------------------------------------
// Peer-to-peer mesh

/** Which way media flows on one m-section, from this side's point of view. */
function direction(send, receive) {
  if (send && receive) return 'sendrecv';
  if (send) return 'sendonly';
  if (receive) return 'recvonly';
  return 'inactive';
}

/**
 * One RTCPeerConnection to one remote participant. The `initiator` (the later joiner) sends the offers; the
 * other side answers. Every incoming signal goes through one queue, so descriptions and candidates are applied
 * in the order they arrived; candidates that come before a remote description wait for it.
 */
class PeerLink {
  constructor({ participantId, initiator, iceServers, localTracks, publish, subscribe, send, events }) {
    this.participantId = participantId;
    this.initiator = initiator;
    this.localTracks = localTracks; // {audio: MediaStreamTrack|null, video: ..., stream: MediaStream|null}
    this.publish = publish;
    this.subscribe = subscribe;
    this.send = send;
    this.events = events;
    this.remoteStream = new MediaStream();
    this.pendingCandidates = [];
    this.iceRestarts = 0;
    this.closed = false;
    this._queue = Promise.resolve();

    const pc = new RTCPeerConnection({ iceServers });
    this.pc = pc;
    pc.onicecandidate = (event) => this._onLocalCandidate(event.candidate);
    pc.ontrack = (event) => this._onTrack(event);
    pc.onconnectionstatechange = () => this._onStateChange();
    pc.oniceconnectionstatechange = () => this._onStateChange();
  }

  /** The initiator sets up its transceivers and sends the first offer. */
  start() {
    if (!this.initiator) return;
    this._enqueue(async () => {
      for (const kind of ['audio', 'video']) {
        const track = this.publish ? this.localTracks[kind] : null;
        const init = { direction: direction(Boolean(track), this.subscribe) };
        if (track && this.localTracks.stream) init.streams = [this.localTracks.stream];
        this.pc.addTransceiver(track || kind, init);
      }
      await this._sendOffer(false);
    });
  }

  handleSignal(message) {
    this._enqueue(async () => {
      if (message.type === 'offer') await this._onOffer(message.sdp);
      else if (message.type === 'answer') await this._onAnswer(message.sdp);
      else if (message.type === 'candidate') await this._onRemoteCandidate(message.candidate);
    });
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    this.pc.onicecandidate = this.pc.ontrack = null;
    this.pc.onconnectionstatechange = this.pc.oniceconnectionstatechange = null;
    this.pc.close();
    for (const track of this.remoteStream.getTracks()) track.stop();
    this.events.peerState(this.participantId, {
      connectionState: 'closed', iceConnectionState: 'closed', state: 'closed',
    });
  }

  _enqueue(task) {
    this._queue = this._queue.then(async () => {
      if (this.closed) return;
      try {
        await task();
      } catch (err) {
        if (!this.closed) {
          this.events.error(new HuddleError('peer_error',
            `connection to ${this.participantId} failed: ${err.message}`, { cause: err }));
        }
      }
    });
  }

  async _sendOffer(iceRestart) {
    const offer = await this.pc.createOffer(iceRestart ? { iceRestart: true } : undefined);
    await this.pc.setLocalDescription(offer);
    this.send({ type: 'offer', to: this.participantId, sdp: this.pc.localDescription.sdp });
  }

  async _onOffer(sdp) {
    if (this.pc.signalingState !== 'stable') {
      // Only the initiator offers, so this is rare (an offer of ours crossed theirs); theirs wins.
      await this.pc.setLocalDescription({ type: 'rollback' });
    }
    await this.pc.setRemoteDescription({ type: 'offer', sdp });
    await this._configureAnswerTransceivers();
    await this._flushCandidates();
    const answer = await this.pc.createAnswer();
    await this.pc.setLocalDescription(answer);
    this.send({ type: 'answer', to: this.participantId, sdp: this.pc.localDescription.sdp });
  }

  /** On the answering side: put the local tracks on the transceivers the offer created. */
  async _configureAnswerTransceivers() {
    for (const transceiver of this.pc.getTransceivers()) {
      if (transceiver.mid === null || transceiver.stopped || transceiver.currentDirection !== null) continue;
      const kind = transceiver.receiver.track.kind;
      const track = this.publish ? this.localTracks[kind] || null : null;
      if (track) {
        await transceiver.sender.replaceTrack(track);
        if (this.localTracks.stream && transceiver.sender.setStreams) {
          transceiver.sender.setStreams(this.localTracks.stream);
        }
      }
      transceiver.direction = direction(Boolean(track), this.subscribe);
    }
  }

  async _onAnswer(sdp) {
    if (this.pc.signalingState !== 'have-local-offer') return; // stale or duplicate answer
    await this.pc.setRemoteDescription({ type: 'answer', sdp });
    await this._flushCandidates();
  }

  async _onRemoteCandidate(candidate) {
    if (!this.pc.remoteDescription) {
      this.pendingCandidates.push(candidate);
      return;
    }
    await this._addCandidate(candidate);
  }

  async _flushCandidates() {
    const queued = this.pendingCandidates;
    this.pendingCandidates = [];
    for (const candidate of queued) await this._addCandidate(candidate);
  }

  async _addCandidate(candidate) {
    try {
      // null means end of candidates, which addIceCandidate() without a candidate signals.
      if (candidate) await this.pc.addIceCandidate(candidate);
      else await this.pc.addIceCandidate();
    } catch (err) {
      // A candidate of an earlier ICE generation, or one this browser cannot use: not fatal.
      if (candidate) console.debug('huddle: ignored remote candidate', candidate.candidate, err.message);
    }
  }

  _onLocalCandidate(candidate) {
    let init = null;
    if (candidate && candidate.candidate) {
      init = { candidate: candidate.candidate, sdpMid: candidate.sdpMid, sdpMLineIndex: candidate.sdpMLineIndex };
      if (candidate.usernameFragment) init.usernameFragment = candidate.usernameFragment;
    }
    this.send({ type: 'candidate', to: this.participantId, candidate: init });
  }

  _onTrack(event) {
    const { track } = event;
    if (!this.remoteStream.getTracks().includes(track)) {
      // One stream per participant, whatever stream ids the other side used (or none).
      for (const old of this.remoteStream.getTracks()) {
        if (old.kind === track.kind) this.remoteStream.removeTrack(old);
      }
      this.remoteStream.addTrack(track);
    }
    this.events.track(this.participantId, this.remoteStream, track);
  }

  _onStateChange() {
    const { connectionState, iceConnectionState } = this.pc;
    this.events.peerState(this.participantId, { connectionState, iceConnectionState, state: connectionState });
    if (connectionState === 'failed' && this.initiator && this.iceRestarts < MAX_ICE_RESTARTS) {
      this.iceRestarts += 1;
      this._enqueue(async () => {
        if (this.pc.signalingState === 'stable') await this._sendOffer(true);
      });
    } else if (connectionState === 'connected') {
      this.iceRestarts = 0;
    }
  }
}

/**
 * "p2p" mode: a full mesh of PeerLinks, one per remote participant. The later joiner offers (connectTo);
 * everyone already present waits for that offer (expect).
 */
export class MeshTransport {
  constructor({ iceServers, localTracks, permissions, send, events }) {
    this.iceServers = iceServers || [];
    this.localTracks = localTracks;
    this.publish = permissions?.publish !== false;
    this.subscribe = permissions?.subscribe !== false;
    this.send = send;
    this.events = events;
    this.links = new Map(); // participant id -> PeerLink
  }

  start() {}

  /** We joined after `participantId`: we offer. */
  connectTo(participantId) {
    this._link(participantId, true).start();
  }

  /** `participantId` joined after us: they will offer. */
  expect(participantId) {
    this._link(participantId, false);
  }

  /** An offer, answer or candidate from another participant (`from`). */
  handleSignal(message) {
    const from = message.from;
    if (typeof from !== 'string') return;
    let link = this.links.get(from);
    if (!link) {
      if (message.type !== 'offer') return; // nothing to attach it to
      link = this._link(from, false);
    }
    link.handleSignal(message);
  }

  remove(participantId) {
    const link = this.links.get(participantId);
    if (!link) return;
    this.links.delete(participantId);
    link.close();
  }

  close() {
    for (const id of [...this.links.keys()]) this.remove(id);
  }

  connections() {
    return [...this.links.values()].map((link) => ({ participantId: link.participantId, pc: link.pc }));
  }

  _link(participantId, initiator) {
    this.remove(participantId);
    const link = new PeerLink({
      participantId,
      initiator,
      iceServers: this.iceServers,
      localTracks: this.localTracks,
      publish: this.publish,
      subscribe: this.subscribe,
      send: this.send,
      events: this.events,
    });
    this.links.set(participantId, link);
    return link;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Local media

const MEDIA_ERROR_WORDS = {
  NotAllowedError: 'access to the camera and microphone was blocked',
  SecurityError: 'access to the camera and microphone was blocked',
  NotFoundError: 'no camera or microphone was found',
  NotReadableError: 'the camera or microphone is in use by another application',
  OverconstrainedError: 'the camera cannot provide the requested video',
  AbortError: 'the camera or microphone could not be started',
  TypeError: 'this browser cannot capture media here (a secure https page is needed)',
};

/**
 * Asks for camera and microphone; when that fails, for the microphone alone, then the camera alone. Resolves
 * with {stream, error}: stream is null when nothing could be captured; error describes what is missing.
 */
async function captureLocalMedia(constraints) {
  if (!navigator.mediaDevices?.getUserMedia) {
    return { stream: null, error: { name: 'TypeError', words: MEDIA_ERROR_WORDS.TypeError } };
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
        return { stream, error: { name: firstError.name, words: `the ${missing} is not available`, partial: true } };
      } catch {
        // try the next one
      }
    }
  }
  const words = MEDIA_ERROR_WORDS[firstError.name] || `the camera and microphone could not be used (${firstError.message})`;
  return { stream: null, error: { name: firstError.name, words } };
}

// ---------------------------------------------------------------------------------------------------------
// The client

/**
 * A participant in a Huddle call.
 *
 * Events (CustomEvent, data in `detail`):
 *   state               {state, previous}  state: idle | connecting | connected | disconnected | error
 *   joined              {self, room, participants, mode, iceServers, permissions}
 *   participant-joined  {participant}
 *   participant-left    {participantId, participant, reason}
 *   participant-updated {participant, isSelf}
 *   track               {participantId, stream, track}
 *   peer-state          {participantId, connectionState, iceConnectionState, state}
 *   local-stream        {stream}           the local camera/microphone stream (null once released)
 *   local-media         {audio, video}     what this client sends, after setAudioEnabled / setVideoEnabled
 *   error               {code, message, source: 'server' | 'local', fatal, requestId}
 */
export class HuddleClient extends EventTarget {
  constructor({ url, mediaConstraints = MEDIA_CONSTRAINTS, pingInterval, silenceTimeout } = {}) {
    super();
    this.url = url || null;
    this.mediaConstraints = mediaConstraints;
    this._signalingOptions = { pingInterval, silenceTimeout };
    this.state = 'idle';
    this.self = null;
    this.room = null;
    this.mode = null;
    this.iceServers = [];
    this.permissions = null;
    this.participants = new Map();
    this.localStream = null;
    this.mediaError = null;
    this._wantAudio = true;
    this._wantVideo = true;
    this._signaling = null;
    this._transport = null;
    this._session = 0;
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
    if (this.state === 'connecting' || this.state === 'connected') {
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
    this.room = room;
    this._setState('connecting');
    const signaling = new SignalingChannel(this.url || defaultSignalingUrl(), this._signalingOptions);
    this._signaling = signaling;
    // Events of a channel this client has let go of (left, torn down) are ignored.
    signaling.addEventListener('message', (event) => {
      if (this._signaling === signaling) this._onMessage(event.detail);
    });
    signaling.addEventListener('close', (event) => {
      if (this._signaling === signaling) this._onSignalingClosed(event.detail);
    });

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
      await signaling.request(request);
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

  /** Leaves the call, closes every connection and releases camera and microphone. */
  leave() {
    this._session += 1;
    const signaling = this._signaling;
    if (signaling) {
      // The server answers `leave` by closing the socket; close it ourselves if it does not.
      this._signaling = null;
      if (signaling.send({ type: 'leave' })) setTimeout(() => signaling.close(1000, 'left'), 2000);
      else signaling.close(1000, 'left');
    }
    this._teardown('self_left');
    this._releaseLocalMedia();
    this._setState('idle');
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

  /** [{participantId, pc}] for every current peer connection. */
  peerConnections() {
    return this._transport ? this._transport.connections() : [];
  }

  // --- messages from the server ---

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
        if (this._transport && this.participants.has(message.from)) this._transport.handleSignal(message);
        break;
      case 'error':
        this._onServerError(message);
        break;
      default:
        break; // pong, and types from newer servers
    }
  }

  _onJoined(message) {
    this.self = { ...message.self };
    this.room = message.room || this.room;
    this.mode = message.mode;
    this.iceServers = message.ice_servers || [];
    this.permissions = message.permissions || { publish: true, subscribe: true, record: true };
    this.participants = new Map();
    for (const participant of message.participants || []) this.participants.set(participant.id, { ...participant });

    if (this.mode !== 'p2p') {
      this._fail(new HuddleError('unsupported_mode', `this client cannot take part in a "${this.mode}" call`));
    }
    this._transport = new MeshTransport({
      iceServers: this.iceServers,
      localTracks: this._localTracks(),
      permissions: this.permissions,
      send: (msg) => this._signaling?.send(msg),
      events: this._transportEvents(),
    });
    this._transport.start();
    for (const id of this.participants.keys()) this._transport.connectTo(id);

    this._setState('connected');
    emit(this, 'joined', this._joinedDetail());
    this._applyLocalMedia(true);
  }

  _onParticipantJoined(participant) {
    if (!participant || typeof participant.id !== 'string' || participant.id === this.self?.id) return;
    this.participants.set(participant.id, { ...participant });
    this._transport?.expect(participant.id);
    emit(this, 'participant-joined', { participant: this.participants.get(participant.id) });
  }

  _onParticipantUpdated(participant) {
    if (!participant || typeof participant.id !== 'string') return;
    if (this.self && participant.id === this.self.id) {
      Object.assign(this.self, participant);
      emit(this, 'participant-updated', { participant: this.self, isSelf: true });
      return;
    }
    const known = this.participants.get(participant.id);
    if (!known) return;
    Object.assign(known, participant);
    emit(this, 'participant-updated', { participant: known, isSelf: false });
  }

  _onParticipantLeft(participantId, reason) {
    const participant = this.participants.get(participantId);
    this._transport?.remove(participantId);
    if (!participant) return;
    this.participants.delete(participantId);
    emit(this, 'participant-left', { participantId, participant, reason: reason || 'left' });
  }

  _onServerError(message) {
    const fatalCodes = ['unauthorized', 'token_expired', 'wrong_room', 'invalid_room', 'invalid_name',
      'room_full', 'already_joined', 'not_joined'];
    const fatal = this.state === 'connecting' && fatalCodes.includes(message.code);
    emit(this, 'error', {
      code: message.code, message: message.message || message.code, source: 'server', fatal,
      requestId: message.id,
    });
  }

  _onSignalingClosed({ code, lost }) {
    const wasConnected = this.state === 'connected';
    this._teardown('connection_lost');
    if (!wasConnected) return; // while connecting, join() reports it through its rejection
    if (code === CLOSE_REPLACED) {
      this._fail(new HuddleError('replaced', 'you joined this call again from another tab or device'));
    } else {
      this._fail(new HuddleError('connection_lost', lost
        ? 'no word from the server for 12 seconds' : `the server closed the connection (${code})`));
    }
    this._setState('disconnected');
  }

  // --- transport plumbing ---

  _transportEvents() {
    return {
      track: (participantId, stream, track) => emit(this, 'track', { participantId, stream, track }),
      peerState: (participantId, states) => emit(this, 'peer-state', { participantId, ...states }),
      error: (error) => this._fail(error, false),
    };
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
    const { stream, error } = await captureLocalMedia(this.mediaConstraints);
    if (session !== this._session) {
      // Left while the browser was asking for the camera.
      for (const track of stream?.getTracks() || []) track.stop();
      return;
    }
    this.localStream = stream;
    this.mediaError = error;
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
    if (this._transport) {
      this._transport.close();
      this._transport = null;
    }
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
    };
  }
}
