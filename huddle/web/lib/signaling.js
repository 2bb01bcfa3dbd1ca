// The signaling socket: one WebSocket speaking the Huddle protocol (docs/protocol.md, version 1).

import { HuddleError, emit } from './errors.js';

export const PROTOCOL_VERSION = 1;
export const ROOM_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;

const PING_INTERVAL_MS = 5000;
const SILENCE_TIMEOUT_MS = 12000;
export const CLOSE_UNAUTHORIZED = 4001; // token refused: reconnecting cannot help
export const CLOSE_REPLACED = 4002; // the server's close code when the same identity joined again elsewhere
export const CLOSE_REMOVED = 4004; // the server removed this participant (e.g. its media timed out)
const CLOSE_DROPPED = 4000; // our own code for a socket we gave up on (no word from the server)
export const CLOSE_SERVICE_RESTART = 1012; // the node stops serving its calls: resume at once, elsewhere if we can

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

/** A WebSocket URL from the server (`redirect`, `doors`), normalised; null for anything else. */
export function cleanSignalingUrl(url) {
  if (typeof url !== 'string') return null;
  try {
    const parsed = new URL(url);
    return parsed.protocol === 'ws:' || parsed.protocol === 'wss:' ? parsed.href : null;
  } catch {
    return null;
  }
}

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

  /**
   * Abandons the socket at once, as a lost network would: no `leave`, no waiting for the closing handshake.
   * The `close` event (lost: true) fires before this returns.
   */
  drop(reason = 'connection dropped') {
    const ws = this.ws;
    this._finish({ code: CLOSE_DROPPED, reason, lost: true });
    try {
      if (ws && ws.readyState <= WebSocket.OPEN) ws.close(CLOSE_DROPPED, reason);
    } catch {
      // already closing
    }
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
      if (performance.now() - this.lastMessageAt > this.silenceTimeout) this.drop('no message from the server');
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
