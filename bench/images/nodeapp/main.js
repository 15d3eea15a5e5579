// The nodeapp workload: an Express web app as Debian packages it (modules under /usr/share/nodejs).
// It loads its modules, builds its routes and answers one request in-process (a container started
// by `ctr run` has no network to listen on), then prints its ready line.
'use strict';
const express = require('express');
const _ = require('lodash');
const yaml = require('js-yaml');
const semver = require('semver');
const { Command } = require('commander');
const debug = require('debug')('nodeapp');

const config = yaml.load('name: nodeapp\nroutes: [health, version]\n');
const app = express();
app.get('/health', (req, res) => res.json({ ok: true }));
app.get('/version', (req, res) => res.json({ node: process.version, lts: semver.gte(process.version, '18.0.0') }));
new Command().option('--port <n>', 'port', '8080').parse(['node', 'main.js']);
debug('routes %o', config.routes);

const req = { method: 'GET', url: '/version', headers: {} };
const res = { setHeader() {}, getHeader() {}, end() {} };
res.json = (body) => {
  console.log(`ready ${config.name} node ${body.node} routes ${_.join(config.routes, ',')}`);
};
app.handle(req, res, (err) => { console.error('not handled', err); process.exit(1); });
