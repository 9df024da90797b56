// Wallet backups: the Ed25519 key (PKCS #8) encrypted under a passphrase, as a small JSON file.
// PBKDF2-SHA256 (600,000 iterations, OWASP's 2023 figure) stretches the passphrase into an AES-GCM
// key; the address is the GCM additional data, so a file whose address was edited does not open.
// Everything happens in this browser: the hub never sees the key or the passphrase.

export const BACKUP_FORMAT = "sourcenet-kvp-wallet-backup";
export const BACKUP_VERSION = 1;
const ITERATIONS = 600_000;
const MIN_ITERATIONS = 100_000; // a file asking for less is refused: it would be weak, or a forgery
const MAX_ITERATIONS = 10_000_000; // and more would hang the page

const encoder = new TextEncoder();
export const hex = (bytes) => [...new Uint8Array(bytes)].map((b) => b.toString(16).padStart(2, "0")).join("");
const base64 = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes)));
const unbase64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
const unbase64url = (text) => unbase64(text.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(text.length / 4) * 4, "="));

export class BackupError extends Error {}

/** The wallet address of a raw public key (hex): "kvp1" + the first 20 bytes of its SHA-256 (docs/protocol.md). */
export async function addressOf(publicKeyHex) {
  const raw = Uint8Array.from(publicKeyHex.match(/../g), (pair) => parseInt(pair, 16));
  return `kvp1${hex(await crypto.subtle.digest("SHA-256", raw)).slice(0, 40)}`;
}

async function passphraseKey(passphrase, salt, iterations, usage) {
  const material = await crypto.subtle.importKey("raw", encoder.encode(passphrase), "PBKDF2", false, ["deriveKey"]);
  return crypto.subtle.deriveKey({ name: "PBKDF2", hash: "SHA-256", salt, iterations }, material,
    { name: "AES-GCM", length: 256 }, false, [usage]);
}

/** A new wallet key, extractable so that it can be backed up; {privateKey, publicKey (hex)}. */
export async function generateWalletKey() {
  const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, true, ["sign", "verify"]);
  return { privateKey: pair.privateKey, publicKey: hex(await crypto.subtle.exportKey("raw", pair.publicKey)) };
}

/** The backup file's JSON text for a key; throws BackupError for a key made not extractable. */
export async function createBackup(key, passphrase) {
  if (!key.privateKey.extractable) {
    throw new BackupError("This wallet key was made before backups existed and cannot be exported from this browser.");
  }
  const address = await addressOf(key.publicKey);
  const salt = crypto.getRandomValues(new Uint8Array(16));
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const pkcs8 = await crypto.subtle.exportKey("pkcs8", key.privateKey);
  const aes = await passphraseKey(passphrase, salt, ITERATIONS, "encrypt");
  const ciphertext = await crypto.subtle.encrypt({ name: "AES-GCM", iv, additionalData: encoder.encode(address) }, aes, pkcs8);
  return JSON.stringify({
    format: BACKUP_FORMAT, version: BACKUP_VERSION, address, public_key: key.publicKey,
    kdf: { name: "PBKDF2", hash: "SHA-256", iterations: ITERATIONS, salt: base64(salt) },
    cipher: { name: "AES-GCM", iv: base64(iv), additional_data: "address" },
    ciphertext: base64(ciphertext),
  }, null, 2);
}

/** Parse a backup file's text; throws BackupError when it is not one this page can open. */
export function parseBackup(text) {
  let backup;
  try {
    backup = JSON.parse(text);
  } catch {
    throw new BackupError("This file is not a wallet backup (it is not JSON).");
  }
  const iterations = backup?.kdf?.iterations;
  if (backup?.format !== BACKUP_FORMAT || backup.version !== BACKUP_VERSION || backup.kdf?.name !== "PBKDF2" ||
      backup.kdf?.hash !== "SHA-256" || backup.cipher?.name !== "AES-GCM" || !Number.isInteger(iterations) ||
      typeof backup.ciphertext !== "string" || typeof backup.address !== "string") {
    throw new BackupError("This file is not a SourceNet wallet backup (version 1).");
  }
  if (iterations < MIN_ITERATIONS || iterations > MAX_ITERATIONS) {
    throw new BackupError(`This backup's key stretching (${iterations} iterations) is outside what this page accepts.`);
  }
  return backup;
}

/** Decrypt a parsed backup; {privateKey, publicKey (hex), address}. A wrong passphrase is a BackupError. */
export async function openBackup(backup, passphrase) {
  let pkcs8;
  try {
    const aes = await passphraseKey(passphrase, unbase64(backup.kdf.salt), backup.kdf.iterations, "decrypt");
    pkcs8 = await crypto.subtle.decrypt({ name: "AES-GCM", iv: unbase64(backup.cipher.iv),
      additionalData: encoder.encode(backup.address) }, aes, unbase64(backup.ciphertext));
  } catch {
    throw new BackupError("Wrong passphrase, or the backup file is damaged: the key could not be decrypted.");
  }
  // Extractable, so that this browser can make a backup of its own later.
  const privateKey = await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, true, ["sign"]);
  const publicKey = hex(unbase64url((await crypto.subtle.exportKey("jwk", privateKey)).x));
  const address = await addressOf(publicKey);
  if (address !== backup.address) throw new BackupError("The backup file is damaged: its key does not match its address.");
  return { privateKey, publicKey, address };
}
