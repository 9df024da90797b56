// The Account view (#/account): profile, password, signed-in devices (revoke one, sign out
// everywhere), where the wallet backup lives, and deleting the account. Signed out, it adds to the
// sign-in form: "Sign in with Google" when the server has Google sign-in configured, and a password
// reset by mail.
import { html, render, useEffect, useRef, useState } from "../vendor/preact-htm.module.js";
import { session, sessionEvents } from "../hub.js";

let context = null;

// --- Google sign-in: OpenID Connect with the browser sent to Google and back (no Google script) ---

const GOOGLE_AUTHORIZE = "https://accounts.google.com/o/oauth2/v2/auth";
const GOOGLE_KEY = "hub.google"; // this tab's pending request: state, nonce, where to come back to
const DELETED_KEY = "hub.account.deleting"; // when this tab asked to delete the account
const DELETE_NOTICE_MS = 60_000; // a sign-out this soon after is the deletion's

// Google comes back to "<page>#id_token=...&state=...": take the answer out of the address before
// the page routes (this module runs before app.js's body), and keep it for signedOut().
const googleAnswer = (() => {
  if (!/^#(?:.*&)?(?:id_token|error)=/.test(location.hash)) return null;
  const params = new URLSearchParams(location.hash.slice(1));
  let pending = null;
  try {
    pending = JSON.parse(sessionStorage.getItem(GOOGLE_KEY) ?? "null");
  } catch { /* nothing pending */ }
  sessionStorage.removeItem(GOOGLE_KEY);
  history.replaceState(null, "", `${location.pathname}${location.search}${pending?.back ?? ""}`);
  return { idToken: params.get("id_token"), state: params.get("state"), error: params.get("error"), pending };
})();

function randomText() {
  const bytes = crypto.getRandomValues(new Uint8Array(24));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** The claims of a JWT, unverified (the server verifies the signature; the page checks its nonce). */
function claimsOf(token) {
  const payload = token.split(".")[1] ?? "";
  const text = atob(payload.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(payload.length / 4) * 4, "="));
  return JSON.parse(new TextDecoder().decode(Uint8Array.from(text, (c) => c.charCodeAt(0))));
}

function goToGoogle(clientId) {
  const state = randomText();
  const nonce = randomText();
  sessionStorage.setItem(GOOGLE_KEY, JSON.stringify({ state, nonce, back: location.hash }));
  const params = new URLSearchParams({
    client_id: clientId, redirect_uri: `${location.origin}/`, response_type: "id_token",
    scope: "openid email profile", state, nonce, prompt: "select_account",
  });
  location.assign(`${GOOGLE_AUTHORIZE}?${params}`);
}

/** Google's answer: check it is the one this tab asked for, then sign in with it. */
async function finishGoogle(api, answer) {
  if (answer.error) throw new Error(answer.error === "access_denied" ? "Google sign-in was cancelled." : `Google refused: ${answer.error}.`);
  if (!answer.pending || answer.state !== answer.pending.state) throw new Error("This Google answer was not asked for by this tab. Try again.");
  let claims;
  try {
    claims = claimsOf(answer.idToken ?? "");
  } catch {
    throw new Error("Google's answer is unreadable. Try again.");
  }
  if (claims.nonce !== answer.pending.nonce) throw new Error("This Google answer was not asked for by this tab. Try again.");
  const data = await api("POST", "/api/v1/auth/google", { id_token: answer.idToken });
  session.store(data);
  // The shell signs in on a new token, as when another tab signs in.
  sessionEvents.dispatchEvent(new CustomEvent("token", { detail: { token: data.token } }));
}

function SignedOutExtras({ api, google }) {
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const [resetNote, setResetNote] = useState("");
  const [resetError, setResetError] = useState("");
  useEffect(() => {
    if (!googleAnswer) return;
    const answer = googleAnswer;
    setBusy(true);
    finishGoogle(api, answer).catch((failure) => setError(failure.message)).finally(() => setBusy(false));
  }, []);
  const requestReset = async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    setResetError("");
    setResetNote("");
    try {
      await api("POST", "/api/v1/auth/password-reset", { email: form.email.value.trim() });
      form.reset();
      setResetNote("If an account has this email, a link to set a new password is on its way. It works once, for 30 minutes.");
    } catch (failure) {
      setResetError(failure.message);
    }
  };
  return html`
    ${google?.configured ? html`
      <div class="google">
        <button type="button" id="google-sign-in" disabled=${busy} onClick=${() => { setError(""); goToGoogle(google.client_id); }}>
          Sign in with Google
        </button>
        <p class="hint">${busy ? "Signing you in with Google…" : "Google asks you to choose an account, then sends you back here."}</p>
      </div>` : null}
    <p class="error" role="alert" id="google-sign-in-error">${error}</p>
    <details class="reset">
      <summary>Forgot your password?</summary>
      <form onSubmit=${requestReset} aria-label="Reset your password by mail">
        <label>Your account's email <input name="email" type="email" autocomplete="email" required /></label>
        <button type="submit">Mail me a reset link</button>
      </form>
      <p class="notice" role="status">${resetNote}</p>
      <p class="error" role="alert">${resetError}</p>
    </details>`;
}

/** Signed out: offer Google sign-in when the server has it configured, and a password reset. */
export async function signedOut({ api }) {
  const place = document.querySelector("#account-sign-in");
  if (!place) return;
  const deleting = Number(sessionStorage.getItem(DELETED_KEY));
  sessionStorage.removeItem(DELETED_KEY);
  if (deleting && Date.now() - deleting < DELETE_NOTICE_MS) { // signed out by this tab's deletion
    const notice = document.querySelector("#sign-in-notice");
    notice.dataset.reason = "Your account has been deleted, and every device it was signed in on signed out.";
    notice.textContent = notice.dataset.reason;
  }
  let google = null;
  try {
    google = await api("GET", "/api/v1/auth/google");
  } catch { /* the password form still works */ }
  render(html`<${SignedOutExtras} api=${api} google=${google} />`, place);
}

// --- the signed-in view -------------------------------------------------------------------------

/** "Chrome on Android" from a User-Agent; the raw string stays in the title. */
export function deviceName(userAgent) {
  if (!userAgent) return "Unknown device";
  const ua = userAgent;
  const browser = /Edg\//.test(ua) ? "Edge" : /OPR\//.test(ua) ? "Opera" : /Firefox\//.test(ua) ? "Firefox"
    : /Chrom(e|ium)\//.test(ua) ? "Chrome" : /Safari\//.test(ua) ? "Safari"
    : /python|aiohttp|curl|httpie|okhttp|node/i.test(ua) ? "An app or script" : "A browser";
  const system = /Android/.test(ua) ? "Android" : /iPhone|iPad|iPod/.test(ua) ? "iOS" : /CrOS/.test(ua) ? "ChromeOS"
    : /Windows/.test(ua) ? "Windows" : /Mac OS X|Macintosh/.test(ua) ? "macOS" : /Linux/.test(ua) ? "Linux" : null;
  return system ? `${browser} on ${system}` : browser;
}

const when = (iso) => (iso ? new Date(iso).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }) : "–");

function Status({ text }) {
  return html`<p class="notice" role="status">${text}</p>`;
}

function Alert({ text, id }) {
  return html`<p class="error" role="alert" id=${id}>${text}</p>`;
}

/** A modal `<dialog>` opened while `open` is true; closing it (Esc, a button) calls onClose. */
function Dialog({ open, onClose, id, labelledby, children }) {
  const ref = useRef(null);
  useEffect(() => {
    const dialog = ref.current;
    if (open && !dialog.open) dialog.showModal();
    else if (!open && dialog.open) dialog.close();
  }, [open]);
  return html`<dialog ref=${ref} id=${id} aria-labelledby=${labelledby} onClose=${onClose}>${children}</dialog>`;
}

function Profile({ me, onSaved }) {
  const [status, setStatus] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const save = async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const wanted = {
      username: form.username.value.trim(), name: form.name.value.trim() || null,
      bio: form.bio.value.trim() || null, avatar_url: form.avatar_url.value.trim() || null,
    };
    const changes = Object.fromEntries(Object.entries(wanted).filter(([key, value]) => (me[key] ?? null) !== value));
    setStatus("");
    setError("");
    if (!Object.keys(changes).length) {
      setStatus("Nothing changed.");
      return;
    }
    setBusy(true);
    try {
      onSaved(await context.api("PATCH", "/api/v1/me", changes));
      setStatus("Profile saved.");
    } catch (failure) {
      setError(failure.field === "username" && failure.code === "conflict"
        ? "This username is taken: choose another." : failure.message);
    } finally {
      setBusy(false);
    }
  };
  return html`
    <section aria-labelledby="account-profile-title" class="card">
      <h3 id="account-profile-title">Profile</h3>
      <form id="account-profile" onSubmit=${save}>
        <label>Username
          <input name="username" required minlength="3" maxlength="50" autocomplete="username"
            defaultValue=${me.username} aria-describedby="account-username-hint" />
        </label>
        <p class="hint" id="account-username-hint">3 to 50 letters, digits, ".", "_" or "-". Others see it next to your DataPods, reviews and scores.</p>
        <label>Display name <input name="name" maxlength="255" autocomplete="name" defaultValue=${me.name ?? ""} /></label>
        <label>About you <textarea name="bio" rows="3" maxlength="1000" defaultValue=${me.bio ?? ""}></textarea></label>
        <label>Picture address (https) <input name="avatar_url" type="url" maxlength="500" placeholder="https://"
          defaultValue=${me.avatar_url ?? ""} /></label>
        <p>Email: <strong id="account-email">${me.email}</strong> <span class="hint">(the email cannot be changed here)</span></p>
        <button type="submit" disabled=${busy}>Save the profile</button>
      </form>
      <${Status} text=${status} />
      <${Alert} text=${error} id="account-profile-error" />
    </section>`;
}

function Password({ onChanged }) {
  const [status, setStatus] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const change = async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    setStatus("");
    setError("");
    if (form.new_password.value !== form.repeat.value) {
      setError("The two new passwords differ.");
      return;
    }
    setBusy(true);
    try {
      const result = await context.api("POST", "/api/v1/me/password",
        { current_password: form.current_password.value, new_password: form.new_password.value });
      form.reset();
      const others = result.sessions_ended ?? 0;
      setStatus(`Password changed.${others ? ` ${others} other device${others === 1 ? " was" : "s were"} signed out.` : ""}`);
      onChanged();
    } catch (failure) {
      setError(failure.field === "current_password" ? "The current password is wrong." : failure.message);
    } finally {
      setBusy(false);
    }
  };
  return html`
    <section aria-labelledby="account-password-title" class="card">
      <h3 id="account-password-title">Password</h3>
      <form id="account-password" onSubmit=${change}>
        <label>Current password <input name="current_password" type="password" autocomplete="current-password" required /></label>
        <label>New password (8 to 128 characters)
          <input name="new_password" type="password" autocomplete="new-password" minlength="8" maxlength="128" required /></label>
        <label>New password again <input name="repeat" type="password" autocomplete="new-password" minlength="8" maxlength="128" required /></label>
        <button type="submit" disabled=${busy}>Change the password</button>
      </form>
      <p class="hint">Changing it signs out every other device. An account made with Google has no password: set one with "Forgot your password?" on the sign-in page.</p>
      <${Status} text=${status} />
      <${Alert} text=${error} id="account-password-error" />
    </section>`;
}

function signOutHere() {
  document.querySelector("#sign-out")?.click(); // the shell's sign-out: this session, this browser
}

function Devices({ version }) {
  const [sessions, setSessions] = useState(null);
  const [status, setStatus] = useState("");
  const [error, setError] = useState("");
  const [confirming, setConfirming] = useState(false);
  const [busy, setBusy] = useState(false);
  const load = async () => {
    try {
      const data = await context.api("GET", "/api/v1/me/sessions");
      setSessions(data.sessions);
      setError("");
      return data.sessions;
    } catch (failure) {
      setError(`Could not list your devices: ${failure.message}`);
      return null;
    }
  };
  useEffect(() => { load(); }, [version]);
  const revoke = async (item) => {
    setStatus("");
    setError("");
    try {
      await context.api("DELETE", `/api/v1/me/sessions/${item.id}`);
      setStatus(`${deviceName(item.user_agent)} is signed out.`);
    } catch (failure) {
      setError(failure.code === "not_found" ? "That device had already signed out." : `Could not sign it out: ${failure.message}`);
    }
    await load();
  };
  const everywhere = async (event) => {
    event.preventDefault();
    setBusy(true);
    setError("");
    try {
      const current = (await load()) ?? [];
      for (const item of current.filter((s) => !s.current)) {
        await context.api("DELETE", `/api/v1/me/sessions/${item.id}`).catch((failure) => {
          if (failure.code !== "not_found") throw failure;
        });
      }
      setConfirming(false);
      signOutHere();
    } catch (failure) {
      setError(`Could not sign out everywhere: ${failure.message}`);
    } finally {
      setBusy(false);
    }
  };
  const others = sessions?.filter((s) => !s.current).length ?? 0;
  return html`
    <section aria-labelledby="account-devices-title" class="card">
      <h3 id="account-devices-title">Signed-in devices</h3>
      <p class="hint">Each browser or app signed in to your account. Sign out any you do not recognise, then change your password.</p>
      ${sessions === null ? html`<p class="hint">Loading your devices…</p>` : html`
        <ul id="account-sessions" class="devices" aria-live="polite">
          ${sessions.map((item) => html`
            <li key=${item.id} data-session=${String(item.id)} class=${item.current ? "current" : ""}>
              <span class="device" title=${item.user_agent ?? ""}>${deviceName(item.user_agent)}</span>
              ${item.current ? html`<strong class="this-device">This device</strong>` : null}
              <span class="seen">${item.ip_address ? `${item.ip_address} · ` : ""}signed in ${when(item.created_at)} · last active ${when(item.last_seen_at)}</span>
              ${item.current
                ? html`<button type="button" onClick=${signOutHere}>Sign out here</button>`
                : html`<button type="button" onClick=${() => revoke(item)}
                    aria-label=${`Sign out ${deviceName(item.user_agent)}, last active ${when(item.last_seen_at)}`}>Sign out</button>`}
            </li>`)}
        </ul>
        ${others ? null : html`<p class="empty">No other device is signed in.</p>`}`}
      <div class="actions">
        <button type="button" onClick=${() => { setStatus(""); load(); }}>Refresh the list</button>
        <button type="button" id="account-sign-out-everywhere" onClick=${() => setConfirming(true)}>Sign out everywhere</button>
      </div>
      <${Status} text=${status} />
      <${Alert} text=${error} id="account-devices-error" />
      <${Dialog} open=${confirming} onClose=${() => setConfirming(false)} id="account-everywhere-dialog" labelledby="account-everywhere-title">
        <form onSubmit=${everywhere}>
          <h2 id="account-everywhere-title">Sign out everywhere?</h2>
          <p>Every device signed in to your account signs out${others ? ` (${others} other${others === 1 ? "" : "s"})` : ""}, and this one too. You can sign in again with your password.</p>
          <div class="actions">
            <button type="button" onClick=${() => setConfirming(false)}>Cancel</button>
            <button type="submit" disabled=${busy}>Sign out everywhere</button>
          </div>
        </form>
      <//>
    </section>`;
}

const BLOCKERS = {
  purchases: "a purchase of yours is still being paid or its payment is held in escrow",
  sales: "a sale of one of your DataPods is still being paid or held in escrow",
  stakes: "you have an active stake: unstake first",
  transfers: "a transfer from your wallet is still pending",
  account: "this is an administrator's account: another administrator must remove the role first",
};

function DeleteAccount() {
  const [open, setOpen] = useState(false);
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const remove = async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const password = form.password.value;
    setError("");
    setBusy(true);
    // The server ends every session as it deletes: this page may be told (and reload, aborting this
    // request) before the answer comes, so the sign-in page is told beforehand.
    sessionStorage.setItem(DELETED_KEY, String(Date.now()));
    try {
      await context.api("DELETE", "/api/v1/me", password ? { password } : {});
      session.clear(); // every tab of this browser shows the sign-in form
      location.reload();
    } catch (failure) {
      if (failure.code) sessionStorage.removeItem(DELETED_KEY); // the server refused: nothing was deleted
      setError(failure.code === "forbidden" && failure.field === "password" ? "The password is wrong: nothing was deleted."
        : failure.code === "forbidden" && failure.field === "session" ? "Sign in with Google again (in the last 5 minutes), then retry."
        : failure.code === "conflict" && BLOCKERS[failure.field] ? `Not deleted: ${BLOCKERS[failure.field]}.`
        : failure.message);
    } finally {
      setBusy(false);
    }
  };
  return html`
    <section aria-labelledby="account-delete-title" class="card danger">
      <h3 id="account-delete-title">Delete the account</h3>
      <p>Deleting is final: your KVP balance is burned, your DataPods are withdrawn (buyers keep what they bought), your
        NFT listings are cancelled, your personal data is removed and every device signs out.</p>
      <button type="button" class="danger" onClick=${() => {
        setError("");
        document.querySelector("#account-delete-dialog form")?.reset(); // a new attempt starts clean
        setOpen(true);
      }}>Delete my account…</button>
      <${Dialog} open=${open} onClose=${() => setOpen(false)} id="account-delete-dialog" labelledby="account-delete-dialog-title">
        <form onSubmit=${remove}>
          <h2 id="account-delete-dialog-title">Delete your account for good?</h2>
          <p>This cannot be undone. Your balance is burned and your username and email are freed.</p>
          <label>Your password, to confirm
            <input name="password" type="password" autocomplete="current-password" aria-describedby="account-delete-hint" />
          </label>
          <p class="hint" id="account-delete-hint">An account made with Google has no password: leave it empty, after signing in with Google in the last 5 minutes.</p>
          <${Alert} text=${error} id="account-delete-error" />
          <div class="actions">
            <button type="button" onClick=${() => setOpen(false)}>Cancel</button>
            <button type="submit" class="danger" disabled=${busy}>Delete my account</button>
          </div>
        </form>
      <//>
    </section>`;
}

function AccountView({ me: initial }) {
  const [me, setMe] = useState(initial);
  const [version, setVersion] = useState(0);
  accountState.refresh = () => setVersion((v) => v + 1);
  const saved = (account) => {
    Object.assign(context.me, account); // the other views read the same object
    const whoami = document.querySelector("#whoami");
    if (whoami) whoami.textContent = account.username;
    setMe({ ...account });
  };
  return html`
    <h2 id="account-title">Your account</h2>
    <div class="account-grid">
      <${Profile} me=${me} onSaved=${saved} />
      <${Devices} version=${version} />
      <${Password} onChanged=${() => setVersion((v) => v + 1)} />
      <section aria-labelledby="account-wallet-title" class="card">
        <h3 id="account-wallet-title">Wallet</h3>
        <p>Your wallet key lives only in your browser: the hub never sees it. Keep a backup file, and restore it in
          any other browser you use.</p>
        <a class="button" href="#/purchases" id="account-wallet-link">Back up or restore the wallet (Purchases)</a>
      </section>
      <${DeleteAccount} />
    </div>`;
}

const accountState = { refresh: null };

export async function start(ctx) {
  context = ctx;
  render(html`<${AccountView} me=${ctx.me} />`, document.querySelector("#tab-account"));
}

/** Opening the view re-reads the devices (someone may have signed in elsewhere meanwhile). */
export async function route() {
  accountState.refresh?.();
}
