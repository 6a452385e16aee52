// Verifies a basalt access token the way a third-party service would: with the public keys
// from /.well-known/jwks.json alone, no shared secret and no call to basalt per request.
//
//   npm install jose
//   BASALT_URL=http://127.0.0.1:7070 node verify-jwks.mjs [ACCESS_TOKEN]
//
// Without a token it signs up a throw-away user to get one, verifies it, and checks that a
// tampered copy and a token for the wrong audience are rejected. BASALT_ISSUER must be the
// server's `public_url` when that is set (tokens' `iss`); it defaults to `basalt`.
import { createRemoteJWKSet, jwtVerify } from 'jose';

const BASALT_URL = process.env.BASALT_URL ?? 'http://127.0.0.1:7070';
const ISSUER = process.env.BASALT_ISSUER ?? 'basalt';

// Fetched on first use and cached; fetched again when a token names an unknown `kid`
// (after `basalt keys rotate-signing`).
const JWKS = createRemoteJWKSet(new URL('/.well-known/jwks.json', BASALT_URL));

export async function verifyBasaltToken(token) {
  const { payload } = await jwtVerify(token, JWKS, {
    issuer: ISSUER,
    audience: 'basalt', // user tokens; admin tokens carry `basalt-admin`
    algorithms: ['EdDSA'],
  });
  return payload; // { sub, role, email, email_verified, is_anonymous, session_id, claims, ... }
}

async function signUpThrowAwayUser() {
  const email = `jwks-${Date.now()}-${Math.floor(Math.random() * 1e6)}@example.com`;
  const res = await fetch(new URL('/v1/auth/signup', BASALT_URL), {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ email, password: 'correct horse battery' }),
  });
  if (!res.ok) throw new Error(`signup answered ${res.status}: ${await res.text()}`);
  return (await res.json()).session.access_token;
}

async function rejects(what, promise) {
  try {
    await promise;
  } catch (err) {
    console.log(`rejected ${what}: ${err.code ?? err.name}`);
    return;
  }
  throw new Error(`${what} was accepted`);
}

const token = process.argv[2] ?? (await signUpThrowAwayUser());
const claims = await verifyBasaltToken(token);
console.log('verified:', JSON.stringify(claims));

if (!process.argv[2]) {
  const [h, p, s] = token.split('.');
  const payload = JSON.parse(Buffer.from(p, 'base64url'));
  payload.sub = 'someone-else';
  const forged = [h, Buffer.from(JSON.stringify(payload)).toString('base64url'), s].join('.');
  await rejects('a tampered token', verifyBasaltToken(forged));
  await rejects(
    'the wrong audience',
    jwtVerify(token, JWKS, { issuer: ISSUER, audience: 'basalt-admin', algorithms: ['EdDSA'] }),
  );
}
