@echo off
rem Luna Daemon launcher for Windows (cmd). Double-click it, or:
rem     start_tray_daemon.bat [luna-daemon options, e.g. --config D:\luna.toml]
rem
rem Python is looked for in this order (same as start_tray_daemon.ps1):
rem   1. %LUNA_PYTHON% (used as it is)
rem   2. ComfyUI portable's embedded Python when this checkout is in
rem      <portable>\ComfyUI\custom_nodes\<this folder>  (its CUDA torch is reused)
rem   3. ComfyUI's venv: <ComfyUI>\venv\Scripts\python.exe
rem   4. the .venv an earlier run created here
rem   5. py -3   6. python on PATH (not the Microsoft Store stub)
rem 5-6 create .venv here. Dependencies are installed only when missing or when
rem pyproject.toml changed: torch first (%LUNA_TORCH_SPEC%, default torch==2.13.0;
rem %LUNA_TORCH_INDEX_URL% for a CUDA build), then pip install -e .
rem The tray then starts with pythonw.exe: no console window stays open.
setlocal EnableExtensions DisableDelayedExpansion

set "HERE=%~dp0"
if "%HERE:~-1%"=="\" set "HERE=%HERE:~0,-1%"
if not defined LUNA_TORCH_SPEC set "LUNA_TORCH_SPEC=torch==2.13.0"
set "VENV=%HERE%\.venv"
set "PY="
set "KIND="
set "TMPF=%TEMP%\luna-launch-%RANDOM%%RANDOM%.txt"

rem ---- 1. LUNA_PYTHON
if defined LUNA_PYTHON call :try_python "%LUNA_PYTHON%" env
if defined PY goto :have_python

rem ---- 2. ComfyUI portable: <portable>\ComfyUI\custom_nodes\<repo>
for %%I in ("%HERE%\..") do set "PARENT_NAME=%%~nxI"
if /I "%PARENT_NAME%"=="custom_nodes" (
    for %%I in ("%HERE%\..\..\..\python_embeded\python.exe") do call :try_python "%%~fI" env
)
if defined PY goto :have_python

rem ---- 3. ComfyUI's own venv: <ComfyUI>\custom_nodes\<repo> -> <ComfyUI>\venv
if /I "%PARENT_NAME%"=="custom_nodes" (
    for %%I in ("%HERE%\..\..\venv\Scripts\python.exe") do call :try_python "%%~fI" env
)
if defined PY goto :have_python

rem ---- 4. the .venv an earlier run created in this checkout
call :try_python "%VENV%\Scripts\python.exe" env
if defined PY goto :have_python

rem ---- 5. the py launcher
where py >nul 2>&1
if not errorlevel 1 (
    py -3 -c "import sys; print(sys.executable)" > "%TMPF%" 2>nul
    if not errorlevel 1 for /f "usebackq delims=" %%P in ("%TMPF%") do call :try_python "%%P" base
)
if defined PY goto :have_python

rem ---- 6. python on PATH, skipping the Store's WindowsApps stub
for /f "delims=" %%P in ('where python 2^>nul') do (
    echo %%P | find /I "\WindowsApps\" >nul || if not defined PY call :try_python "%%P" base
)
if defined PY goto :have_python

echo luna: error: Python 3.10 or newer was not found.
echo luna: install it from https://www.python.org/downloads/ (tick "Add python.exe to PATH") or set LUNA_PYTHON.
goto :fail

:have_python
if "%KIND%"=="base" (
    echo luna: creating "%VENV%" with "%PY%"
    "%PY%" -m venv "%VENV%"
    if errorlevel 1 goto :fail
    set "PY=%VENV%\Scripts\python.exe"
)
echo luna: using "%PY%"

rem ---- install only when missing or changed (same stamp one-liner as the .sh / .ps1)
"%PY%" -c "import sys; print(sys.prefix)" > "%TMPF%"
set /p PREFIX=<"%TMPF%"
set "STAMP=%PREFIX%\.luna-install-stamp"
"%PY%" -c "import hashlib,sys;h=hashlib.sha256(open(sys.argv[1],'rb').read());h.update(('\0'+sys.argv[2]+'\0'+sys.argv[3]).encode());print(h.hexdigest())" "%HERE%\pyproject.toml" "%LUNA_TORCH_SPEC%" "%HERE%" > "%TMPF%"
set /p WANT=<"%TMPF%"
set "HAVE="
if exist "%STAMP%" set /p HAVE=<"%STAMP%"
set "NEED_INSTALL=0"
if not "%HAVE%"=="%WANT%" set "NEED_INSTALL=1"
"%PY%" -c "import luna_daemon, torch" >nul 2>&1
if errorlevel 1 set "NEED_INSTALL=1"
if "%NEED_INSTALL%"=="0" goto :start

"%PY%" -c "import torch" >nul 2>&1
if not errorlevel 1 goto :install_project
echo luna: installing %LUNA_TORCH_SPEC% first, so the project's torch requirement is already satisfied
if defined LUNA_TORCH_INDEX_URL (
    "%PY%" -m pip install --disable-pip-version-check --extra-index-url "%LUNA_TORCH_INDEX_URL%" "%LUNA_TORCH_SPEC%"
) else (
    "%PY%" -m pip install --disable-pip-version-check "%LUNA_TORCH_SPEC%"
)
if errorlevel 1 goto :fail
:install_project
echo luna: installing Luna Daemon (pip install -e .)
"%PY%" -m pip install --disable-pip-version-check -e "%HERE%"
if errorlevel 1 goto :fail
> "%STAMP%" echo %WANT%

:start
"%PY%" -m luna_daemon logs --path %* > "%TMPF%" 2>nul
set "LOGFILE="
set /p LOGFILE=<"%TMPF%"
del "%TMPF%" >nul 2>&1
for %%I in ("%PY%") do set "PYW=%%~dpIpythonw.exe"
if not exist "%PYW%" set "PYW=%PY%"
rem "start" returns at once; pythonw has no console. A second launch exits on its own
rem and the running tray shows a notification ("Luna Daemon is already running").
start "Luna Daemon" /D "%HERE%" "%PYW%" -m luna_daemon tray %*
if errorlevel 1 goto :fail
echo luna: Luna Daemon is starting in the system tray.
echo luna: logs: %LOGFILE%
endlocal
exit /b 0

:fail
if exist "%TMPF%" del "%TMPF%" >nul 2>&1
echo luna: setup failed; see the messages above.
rem keep a double-clicked window open so the message can be read
echo %CMDCMDLINE% | find /I "/c" >nul && pause
endlocal
exit /b 1

rem ---- :try_python EXE KIND: sets PY and KIND if EXE is Python 3.10 or newer
:try_python
if defined PY exit /b 0
if not exist "%~1" exit /b 0
"%~1" -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)" >nul 2>&1
if errorlevel 1 exit /b 0
set "PY=%~f1"
set "KIND=%~2"
exit /b 0
