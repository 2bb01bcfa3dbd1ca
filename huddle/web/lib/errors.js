// Shared by every module of the client: its error type and how events are raised.

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

/** Dispatches a CustomEvent `type` carrying `detail` on `target`. */
export function emit(target, type, detail) {
  target.dispatchEvent(new CustomEvent(type, { detail }));
}
